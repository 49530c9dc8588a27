"""Training on DeepSpeed ranks: the OCT teacher (stage 1) and the fundus student (stage 2).

``run(cfg)`` is the whole job; every rank calls it (torchrun, the deepspeed launcher or Slurm set
the environment, :mod:`multieye_dist.distributed`). The student is the DeepSpeed engine; the
teacher is a :class:`FrozenTeacher` outside it. Rank 0 writes the run directory::

    <train.out_dir>/config.yaml            resolved config
    <train.out_dir>/checkpoints/<tag>/     DeepSpeed checkpoints (+ trainer_state.json), latest
    <train.out_dir>/best.safetensors       inference export of the best dev macro-F1 model
    <train.out_dir>/last.safetensors       inference export of the final model
    <train.out_dir>/eval/*.json            dev/test results (release metrics)
    <train.out_dir>/metrics.jsonl, summary.json, run_id.txt, ...  (multieye_dist.tracking)
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from multieye_dist import distributed as D
from multieye_dist import engine as E
from multieye_dist.atomic import write_text
from multieye_dist.checkpoint import export_inference, load_inference
from multieye_dist.concepts import load_bank
from multieye_dist.config import Config, save_resolved, to_dict
from multieye_dist.data.prefetch import DevicePrefetcher
from multieye_dist.data.prepare import BatchPreparer
from multieye_dist.data.remote import resolve_shards
from multieye_dist.data.stream import (
    Batch,
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    StreamStats,
    make_loader,
    resolve_augment_on,
)
from multieye_dist.evaluation import evaluate_split
from multieye_dist.metrics import format_table
from multieye_dist.model import FrozenTeacher, build_model, param_dtype
from multieye_dist.objectives import Objective, Terms, build_objective
from multieye_dist.tracking import OLD_RUN_ID_KEY, Tracker

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainState:
    """What a checkpoint restores beyond DeepSpeed's own state (JSON in the checkpoint)."""

    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of `epoch` this rank has consumed
    step: int = 0  # optimizer steps
    best_f1: float = -1.0
    best_epoch: int = -1
    nonfinite: int = 0  # skipped steps, whole run
    nonfinite_in_row: int = 0
    run_id: str | None = None  # the tracker's run, continued on resume

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        if OLD_RUN_ID_KEY in d and "run_id" not in d:  # a checkpoint from before the rename
            d = {**d, "run_id": d[OLD_RUN_ID_KEY]}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Meter:
    """Sums of the loss terms since the last log line, kept on the device: reading a loss to
    the host every step would stall the GPU pipeline (one sync per log line instead). The
    names are the objective's terms, in the order it returns them (the same every step)."""

    names: tuple[str, ...] = ()
    sums: torch.Tensor | None = None
    steps: int = 0
    samples: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, terms: Terms, samples: int) -> None:
        vec = torch.stack([t.double() for t in terms.values()])
        if self.sums is None:
            self.names, self.sums = tuple(terms), vec
        else:
            self.sums = self.sums + vec
        self.steps += 1
        self.samples += samples


@dataclass
class Job:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: Config
    env: D.DistEnv
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

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.cfg.train.precision == "autocast-bf16" else None


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config, *, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train as configured; returns the final summary (on every rank; metrics on rank 0).

    `stop_requested` (e.g. set by a preemption signal) is polled at every step; once it is true
    on any rank, every rank saves a checkpoint at the next optimizer step and the run returns
    ``{"stopped": True, "preempted": True, ...}``: resuming repeats and loses no step.
    """
    job, state = setup(cfg)
    try:
        return _train(cfg, job, state, stop_requested)
    except BaseException:  # as torchtitan's main: the tracker's run ends failed, then the error
        job.tracker.finish(exit_code=1)
        raise


def _train(
    cfg: Config, job: Job, state: TrainState, stop_requested: Callable[[], bool] | None
) -> dict[str, Any]:
    """The epochs of :func:`run`, after :func:`setup`."""
    meter, start_step, stopping = Meter(), state.step, False
    stop_at = (
        None if cfg.train.stop_after_steps is None else start_step + cfg.train.stop_after_steps
    )
    for epoch in range(state.epoch, cfg.train.epochs):
        job.stream.set_epoch(epoch, skip=state.batch)
        for batch in _progress(job, epoch, state.batch):
            if state.batch >= job.usable_batches:
                break  # the micro-batches left over by gradient accumulation
            asked = stop_requested is not None and stop_requested()
            terms, stop_flag = train_step(job, batch, stop=asked)
            stopping = stopping or stop_flag  # every rank sees the same reduced flag
            state.batch += 1
            _count_nonfinite(job, state, terms)
            if terms is not None:
                meter.add(terms, job.cfg.data.batch_size)
            if job.engine.global_steps == state.step:
                continue  # still accumulating
            state.step = job.engine.global_steps
            if state.step % cfg.train.log_every_steps == 0:
                log_train(job, state, meter, batch.stats)
                meter = Meter()
            if stopping:
                save(job, state)
                return stop(job, state, "stop requested (preemption or time limit)", True)
            if stop_at is not None and state.step >= stop_at:
                save(job, state)
                return stop(job, state, f"stopped after {cfg.train.stop_after_steps} steps")
            if state.step % cfg.train.checkpoint_every_steps == 0:
                save(job, state)
        state.epoch, state.batch = epoch + 1, 0
        last = state.epoch == cfg.train.epochs
        if last or state.epoch % cfg.train.eval_every_epochs == 0:
            evaluate_dev(job, state)
        save(job, state)
    return finish(job, state)


def train_step(job: Job, batch: Batch, stop: bool = False) -> tuple[Terms | None, bool]:
    """Seed, objective, finite check, backward and (at accumulation boundaries) the optimizer
    step. Returns the terms to log (``loss`` and the objective's, on the device), or None when
    the loss was not finite on some rank (nothing is applied then), and whether some rank asked
    to stop. The finite check and the stop flag travel in one all-reduce: the step's only host
    sync (the gate and everything else stay on the device)."""
    engine = job.engine
    torch.manual_seed(_step_seed(job, engine.global_steps))  # dropout etc.: a function of step
    job.objective.set_step(engine.global_steps)
    batch = batch.to(job.device, non_blocking=True)  # no-op when the prefetcher moved it
    batch = job.prepare(batch)  # augmentation on the device (data.augment_on=device)
    total, terms = job.objective(engine, job.teacher, batch)
    finite, stop = D.step_flags(total, stop)
    if not finite:
        return None, stop
    engine.backward(total)
    engine.step()
    return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}, stop


def _step_seed(job: Job, step: int) -> int:
    return (job.cfg.train.seed * 1_000_003 + step) * 4099 + job.env.rank


def _count_nonfinite(job: Job, state: TrainState, terms: Terms | None) -> None:
    if terms is not None:
        state.nonfinite_in_row = 0
        return
    state.nonfinite += 1
    state.nonfinite_in_row += 1
    limit = job.cfg.optim.max_nonfinite_in_row
    logger.warning(
        "non-finite loss at epoch %d batch %d: step skipped (%d in a row, %d in all)",
        state.epoch,
        state.batch,
        state.nonfinite_in_row,
        state.nonfinite,
    )
    if state.nonfinite_in_row >= limit:
        raise TrainingError(
            f"{state.nonfinite_in_row} non-finite losses in a row (optim.max_nonfinite_in_row="
            f"{limit}) at epoch {state.epoch}, batch {state.batch}: lower optim.lr, check the "
            "data, or try train.precision=fp32"
        )


def _progress(job: Job, epoch: int, skip: int):
    return tqdm(
        DevicePrefetcher(job.loader, job.device, job.cfg.perf.prefetch),
        total=job.usable_batches - skip,
        desc=f"{job.cfg.train.stage} epoch {epoch + 1}/{job.cfg.train.epochs}",
        disable=not (job.env.is_main and job.cfg.train.progress),
        mininterval=2,
        leave=False,
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------- setup


def setup(cfg: Config) -> tuple[Job, TrainState]:
    """Checks, process group, data, models, engine, resume, tracker, in that order."""
    run_dir = Path(cfg.train.out_dir)
    # What can be checked without the other ranks fails here, before any collective.
    checkpoint = E.find_checkpoint(cfg.train.resume, run_dir / "checkpoints")
    env = D.from_env()
    device = D.device_for(env)
    objective = build_objective(cfg, device)
    if objective.needs_teacher and cfg.teacher.checkpoint is None:
        raise ValueError(
            "teacher.checkpoint is not set: distillation needs the teacher run's inference "
            "export (e.g. teacher.checkpoint=runs/teacher/best.safetensors), or use "
            "loss.name=fundus-only"
        )
    E.init_distributed(env, device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if env.is_main:
        save_resolved(cfg, run_dir)
    bank, sentences, _ = load_bank(resolve_path(cfg.concepts.bank))
    stream = build_stream(cfg, env, objective)
    # Student weights stay in the default layout: DeepSpeed broadcasts them as byte views and
    # ZeRO keeps them as views of one flat buffer. perf.channels_last makes the inputs NHWC,
    # which is what makes convolutions pick NHWC kernels.
    model = build_model(cfg.model, bank).to(device)
    objective.freeze_unreached(model)
    teacher = build_teacher(cfg, bank, device) if objective.needs_teacher else None
    steps_per_epoch = len(stream) // cfg.optim.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.samples_per_epoch={cfg.data.samples_per_epoch} gives {len(stream)} batch(es) "
            f"per rank, fewer than optim.grad_accum={cfg.optim.grad_accum}: no optimizer step"
        )
    engine = E.build_engine(
        model,
        optim=cfg.optim,
        ds=cfg.deepspeed,
        precision=cfg.train.precision,
        micro_batch=cfg.data.batch_size,
        world=env.world,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
    )
    if cfg.perf.compile:
        engine.compile()  # DeepSpeed's wrapper around torch.compile of the student
    state = resume(engine, checkpoint)
    loader = make_loader(stream, cfg.data.num_workers)
    # The tracker last: from here on run() owns it and finishes it, failed or not.
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
        sentences,
        objective,
        BatchPreparer(cfg.data.image_size),
        usable_batches=steps_per_epoch * cfg.optim.grad_accum,
    )
    logger.info(
        "%s: %d rank(s) on %s, %d steps/epoch x %d epochs, precision %s, ZeRO %d, from step %d, "
        "augmentation on the %s",
        objective.describe(),
        env.world,
        device,
        steps_per_epoch,
        cfg.train.epochs,
        cfg.train.precision,
        cfg.deepspeed.zero_stage,
        state.step,
        resolve_augment_on(cfg.data.augment_on),
    )
    return job, state


def resolve_path(path: str) -> Path:
    """A relative path from the working directory, else from the project root (so the shipped
    defaults such as the concept bank work from anywhere in a checkout)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = Path(__file__).resolve().parents[1] / p
    return alt if alt.exists() else p


def build_stream(cfg: Config, env: D.DistEnv, objective: Objective) -> PairedTrainStream:
    """The objective's primary modality, with partners when it reads them (the fundus-only
    baseline reads fundus alone: decoding partners it would not use costs half the loader)."""
    shard_dir = resolve_shards(cfg.data.shards)  # a directory or a URL prefix
    primary = ShardSet.from_manifest(shard_dir, objective.modality, "train")
    partner = None
    if objective.partner is not None:
        partner = ShardSet.from_manifest(shard_dir, objective.partner, "train")
    scfg = StreamConfig.from_data(cfg.data)
    return PairedTrainStream(
        primary,
        partner,
        scfg,
        rank=env.rank,
        world=env.world,
        partner_classes=objective.partner_classes,
    )


def build_teacher(cfg: Config, bank: torch.Tensor, device: torch.device) -> FrozenTeacher:
    path = resolve_path(cfg.teacher.checkpoint)
    model, meta = load_inference(path)
    if model.concepts.shape != bank.shape or not torch.allclose(model.concepts, bank.float()):
        raise ValueError(
            f"teacher.checkpoint={path}: its concept bank {tuple(model.concepts.shape)} differs "
            f"from concepts.bank={cfg.concepts.bank} {tuple(bank.shape)}; teacher and student "
            "must share one concept space"
        )
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


def resume(engine, path: Path | None) -> TrainState:
    if path is None:
        return TrainState()
    state = TrainState.from_dict(E.load_checkpoint(engine, path))
    if state.step != engine.global_steps:
        raise RuntimeError(
            f"{path}: trainer_state step {state.step} != DeepSpeed's {engine.global_steps}"
        )
    return state


# ----------------------------------------------------------------------------- logging


def log_train(job: Job, state: TrainState, meter: Meter, stats: StreamStats) -> None:
    """Mean loss terms over the interval and over ranks (one small all-reduce), rank 0 logs.
    An interval whose steps were all skipped (non-finite on every rank alike) has no terms."""
    sums = meter.sums if meter.sums is not None else torch.zeros(0, device=job.device)
    vec = torch.cat(
        [sums.double(), torch.tensor([float(meter.steps)], device=sums.device, dtype=torch.float64)]
    )
    if D.world_size() > 1:
        torch.distributed.all_reduce(vec)  # on the device: NCCL reduces CUDA tensors only
    if not job.env.is_main:
        return
    host = vec.tolist()
    n = max(host[-1], 1.0)
    elapsed = time.perf_counter() - meter.t0
    values = {f"train/{k}": host[i] / n for i, k in enumerate(meter.names)}
    values.update(
        {
            "train/lr": E.current_lr(job.engine),
            "train/epoch": state.epoch + state.batch / job.usable_batches,
            "train/samples_per_s": meter.samples * job.env.world / max(elapsed, 1e-9),
            "train/nonfinite_skipped": state.nonfinite,
            "data/bad": stats.bad,
            "data/unmatched_oct": stats.unmatched_oct,
        }
    )
    job.tracker.log(values, step=state.step)
    logger.debug("step %d %s", state.step, values)


def evaluate_dev(job: Job, state: TrainState) -> None:
    """Dev metrics; a new best macro-F1 is exported as best.safetensors."""
    result = _evaluate(job, job.engine.module, "dev")
    f1 = D.broadcast_object(result["f1"] if result else None)
    if f1 > state.best_f1:
        state.best_f1, state.best_epoch = f1, state.epoch
        export(job, state, "best")
    if job.env.is_main:
        job.tracker.log_eval(result, prefix="dev/", step=state.step)
        _write_json(job.run_dir / "eval" / f"dev_epoch{state.epoch:03d}.json", result)
        logger.info(
            "epoch %d: dev macro-F1 %.2f  acc %.2f  (best %.2f at epoch %d)",
            state.epoch,
            100 * f1,
            100 * result["accuracy"],
            100 * state.best_f1,
            state.best_epoch,
        )


def _evaluate(job: Job, model: torch.nn.Module, split: str) -> dict | None:
    D.average_batchnorm_stats(job.engine.module)
    d = job.cfg.data
    return evaluate_split(
        model,
        resolve_shards(d.shards),
        job.objective.modality,
        split,
        image_size=d.image_size,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        device=job.device,
        autocast_dtype=job.autocast_dtype,
        max_bad_fraction=d.max_bad_fraction,
        progress=job.env.is_main and job.cfg.train.progress,
        augment_on=d.augment_on,
    )


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- saving


def save(job: Job, state: TrainState) -> None:
    D.average_batchnorm_stats(job.engine.module)
    E.save_checkpoint(
        job.engine,
        job.run_dir / "checkpoints",
        f"step{state.step:08d}",
        asdict(state),
        keep=job.cfg.train.keep_checkpoints,
    )


def export(job: Job, state: TrainState, name: str) -> Path:
    """Inference export (rank 0): fp32 weights, the resolved config and where it came from."""
    path = job.run_dir / f"{name}.safetensors"
    if job.env.is_main:
        model = job.engine.module
        if param_dtype(model) != torch.float32:  # train.precision=bf16
            logger.info("%s: exporting bf16 weights as fp32 (train.precision=bf16)", path)
            model = copy.deepcopy(model).float()
        extra = {
            "config": to_dict(job.cfg),
            "epoch": state.epoch,
            "step": state.step,
            "dev_f1": state.best_f1 if name == "best" else None,
            "modality": job.objective.modality,
        }
        export_inference(
            path,
            model,
            job.cfg.model,
            concept_sentences=job.sentences,
            image_size=job.cfg.data.image_size,
            extra=extra,
        )
    D.barrier()
    return path


def stop(job: Job, state: TrainState, reason: str, preempted: bool = False) -> dict[str, Any]:
    logger.info("%s at step %d; resume with train.resume=auto", reason, state.step)
    job.tracker.finish()
    return {"stopped": True, "preempted": preempted, "step": state.step, "reason": reason}


def finish(job: Job, state: TrainState) -> dict[str, Any]:
    """Export the last model; score test with the best and the last; write the summary."""
    export(job, state, "last")
    summary: dict[str, Any] = {
        "step": state.step,
        "best_epoch": state.best_epoch,
        "best_dev_f1": state.best_f1,
        "nonfinite_skipped": state.nonfinite,
    }
    for name in ("best", "last"):
        path = job.run_dir / f"{name}.safetensors"
        model = job.engine.module if name == "last" else load_inference(path)[0].to(job.device)
        result = _evaluate(job, model, "test")
        if job.env.is_main:
            _write_json(job.run_dir / "eval" / f"test_{name}.json", result)
            summary.update(
                {f"test/{name}/{k}": result[k] for k in ("accuracy", "f1", "auc", "map", "kappa")}
            )
            logger.info("test, %s model (%s):\n%s", name, path, format_table(result))
    if job.env.is_main:
        job.tracker.summary(summary)
    job.tracker.finish()
    D.barrier()
    return summary
