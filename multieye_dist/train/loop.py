"""Training on DeepSpeed ranks: the OCT teacher (stage 1) and the fundus student (stage 2).

``run(cfg)`` is the whole job; every rank calls it (torchrun, the deepspeed launcher or Slurm set
the environment, :mod:`multieye_dist.core.distributed`). The student is the DeepSpeed engine; the
teacher is a :class:`FrozenTeacher` outside it. Rank 0 writes the run directory::

    <train.out_dir>/config.yaml            resolved config
    <train.out_dir>/checkpoints/<tag>/     DeepSpeed checkpoints (+ trainer_state.json), latest
    <train.out_dir>/best.safetensors       inference export of the best dev macro-F1 model
    <train.out_dir>/last.safetensors       inference export of the final model
    <train.out_dir>/eval/*.json            dev/test results (release metrics)
    <train.out_dir>/metrics.jsonl, summary.json, run_id.txt, ...  (multieye_dist.track.tracking)
    <train.out_dir>/train.lock             held while a training runs (multieye_dist.core.runlock)

Nothing is written there before the command is fully checked (:func:`preflight`): a refused
command leaves a finished run's directory exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from multieye_dist.config import (
    Config,
    ConfigError,
    check_world,
    load_config,
    save_resolved,
    to_dict,
)
from multieye_dist.core import distributed as D
from multieye_dist.core.atomic import write_text
from multieye_dist.core.resources import user_path
from multieye_dist.core.runlock import NoLock, RunLock, RunLocked, acquire, check_free
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
from multieye_dist.model.checkpoint import FORMAT, export_inference, load_inference
from multieye_dist.model.concept_model import FrozenTeacher, ModelConfig, build_model, param_dtype
from multieye_dist.model.concepts import load_bank
from multieye_dist.track.metrics import NonFiniteError, format_table
from multieye_dist.track.plots import plot_run_safely
from multieye_dist.track.records import OLD_RUN_ID_KEY, RECORDS_SUFFIX
from multieye_dist.track.tracking import Tracker
from multieye_dist.train import engine as E
from multieye_dist.train.evaluation import evaluate_split
from multieye_dist.train.objectives import (
    Objective,
    Terms,
    bank_concept_findings,
    build_objective,
    objective_class,
)
from multieye_dist.train.signals import Interrupted, StopFlag, handle_stop_signals

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What a stop signal of the `multieye-dist train` command ends with (SIGUSR2 is Slurm's: requeue).
_EXIT_SIGNALS = ("SIGTERM", "SIGINT")
_DIVERGED_ADVICE = "lower optim.lr, check the data, or try train.precision=fp32"
# The identity key of the optimizer step's size (run_identity), and the one before elastic resume.
PER_STEP = "micro-batches per step (ranks x optim.grad_accum)"
_OLD_WORLD_KEY = "ranks (WORLD_SIZE)"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainState:
    """What a checkpoint restores beyond DeepSpeed's own state (JSON in the checkpoint)."""

    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of `epoch` each rank has consumed
    # The ranks that consumed `batch` batches each (0: a checkpoint from before elastic resume):
    # batch x world is the epoch's global position, which a resume on other ranks divides.
    world: int = 0
    step: int = 0  # optimizer steps
    best_f1: float = -1.0
    best_epoch: int = -1
    nonfinite: int = 0  # skipped steps, whole run
    nonfinite_in_row: int = 0  # carried across epochs and resumes: the guard's count
    run_id: str | None = None  # the tracker's run, continued on resume
    identity: dict[str, Any] | None = None  # run_identity(): what a resume must not change

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
class Clock:
    """The loop's host wall-clock, for the log line's pairs/s, data-wait share and ETA. Only
    host time is read (no device sync: the step's one host sync, its finite check, already
    paces the host to the device, so the wall-clock between batches is the step's)."""

    start_step: int
    t0: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # epoch ends (evaluation, saving): not training steps, not in the ETA
    wait: float = 0.0  # waiting for the loader's next batch, since the last log line

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """`batches`, adding the time each next() takes (the loader's lag) to ``wait``."""
        t = time.perf_counter()
        it = iter(batches)  # starting the loader's workers is waiting for data too
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            self.wait += now - t
            yield batch
            t = time.perf_counter()

    def pause(self, seconds: float, meter: Meter) -> None:
        self.paused += seconds
        meter.t0 += seconds

    def eta(self, step: int, last_step: int) -> float | None:
        """Seconds to `last_step` at this run's mean pace so far (None before a step)."""
        done = step - self.start_step
        if done < 1:
            return None
        spent = time.perf_counter() - self.t0 - self.paused
        return spent / done * max(last_step - step, 0)


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
    lock: RunLock = field(default_factory=NoLock)  # the run directory's (rank 0 holds it)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.cfg.train.precision == "autocast-bf16" else None


# ----------------------------------------------------------------------------- the loop


def run(
    cfg: Config,
    *,
    stop_requested: Callable[[], bool] | None = None,
    on_dev_f1: Callable[[int, float], bool] | None = None,
) -> dict[str, Any]:
    """Train as configured; returns the final summary (on every rank; metrics on rank 0).

    `stop_requested` (e.g. set by a preemption signal) is polled at every step; once it is true
    on any rank, every rank saves a checkpoint at the next optimizer step and the run returns
    ``{"stopped": True, "preempted": True, ...}``: resuming repeats and loses no step.

    Without it (``multieye-dist train``), SIGTERM and SIGINT are the stop signals: every rank
    saves at the next step as above, then :class:`~multieye_dist.train.signals.Interrupted` exits
    the process with 128 + the signal (143 for SIGTERM, 130 for SIGINT) on the signalled ranks, so
    that ``train teacher && train distill`` does not go on; resume with the same command. A
    second SIGINT aborts at once, saving nothing more (130). Neither prints a traceback.

    `on_dev_f1(epoch, best dev macro-F1 so far)` (an offline sweep's pruner) is called on rank 0
    after each dev evaluation; rank 0's answer is broadcast, and True stops every rank: a
    checkpoint is saved and the run returns ``{"stopped": True, "pruned": True, ...}``, its
    summary.json saying ``pruned``.
    """
    if stop_requested is not None:
        return _run(cfg, stop_requested, on_dev_f1)
    flag = StopFlag()
    with handle_stop_signals(flag):
        try:
            summary = _run(cfg, flag, on_dev_f1)
        except KeyboardInterrupt:
            logger.error("aborted by a second SIGINT: nothing saved after the last checkpoint")
            raise Interrupted(128 + signal.SIGINT) from None
    if summary.get("signal") in _EXIT_SIGNALS:
        raise Interrupted(128 + signal.Signals[summary["signal"]])
    return summary


def _run(
    cfg: Config,
    stop_requested: Callable[[], bool],
    on_dev_f1: Callable[[int, float], bool] | None = None,
) -> dict[str, Any]:
    cfg = data_classes(cfg)  # model.num_classes as the training data's manifests say
    job, state = setup(cfg)
    try:
        # Log lines printed above the progress bar, not through it (rank 0 draws the bars).
        bars = job.env.is_main and cfg.train.progress
        with logging_redirect_tqdm() if bars else contextlib.nullcontext():
            return _train(cfg, job, state, stop_requested, on_dev_f1)
    except BaseException:  # as torchtitan's main: the tracker's run ends failed, then the error
        job.tracker.finish(exit_code=1)
        raise
    finally:
        job.lock.release()


def _train(
    cfg: Config,
    job: Job,
    state: TrainState,
    stop_requested: Callable[[], bool] | None,
    on_dev_f1: Callable[[int, float], bool] | None = None,
) -> dict[str, Any]:
    """The epochs of :func:`run`, after :func:`setup`."""
    meter, start_step, stopping = Meter(), state.step, False
    stop_at = (
        None if cfg.train.stop_after_steps is None else start_step + cfg.train.stop_after_steps
    )
    steps_per_epoch = job.usable_batches // cfg.optim.grad_accum
    last_step = cfg.train.epochs * steps_per_epoch if stop_at is None else stop_at
    clock = Clock(start_step)
    for epoch in range(state.epoch, cfg.train.epochs):
        job.stream.set_epoch(epoch, skip=state.batch)
        bar = _progress(job, epoch, state.batch, clock)
        for batch in bar:
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
                loss = log_train(job, state, meter, batch.stats, clock, last_step)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                meter, clock.wait = Meter(), 0.0
            if stopping:
                save(job, state)
                name = getattr(stop_requested, "name", None)
                if name in _EXIT_SIGNALS:
                    return stop(job, state, f"stopped by {name}", signame=name)
                return stop(job, state, "stop requested (preemption, time limit or a signal)", True)
            if stop_at is not None and state.step >= stop_at:
                save(job, state)
                return stop(job, state, f"stopped after {cfg.train.stop_after_steps} steps")
            if state.step % cfg.train.checkpoint_every_steps == 0:
                save(job, state)
        bar.close()
        t_end = time.perf_counter()
        state.epoch, state.batch = epoch + 1, 0
        last = state.epoch == cfg.train.epochs
        if last or state.epoch % cfg.train.eval_every_epochs == 0:
            evaluate_dev(job, state)
            if _no_better(cfg, state):  # every rank: best_epoch is the broadcast F1's
                logger.info(
                    "early stop at epoch %d: dev macro-F1 not better than %.2f (epoch %d) for "
                    "%d evaluations (train.early_stop_evals)",
                    state.epoch,
                    100 * state.best_f1,
                    state.best_epoch,
                    cfg.train.early_stop_evals,
                )
                save(job, state)
                break
            if on_dev_f1 is not None:  # rank 0 asks the sweep's pruner; every rank obeys it
                prune = job.env.is_main and on_dev_f1(state.epoch, state.best_f1)
                if D.broadcast_object(bool(prune)):
                    save(job, state)
                    reason = f"pruned by the sweep at epoch {state.epoch}"
                    return stop(job, state, reason, pruned=True)
        save(job, state)
        clock.pause(time.perf_counter() - t_end, meter)
    return finish(job, state)


def _no_better(cfg: Config, state: TrainState) -> bool:
    """train.early_stop_evals dev evaluations in a row without a better macro-F1."""
    patience = cfg.train.early_stop_evals * cfg.train.eval_every_epochs
    return patience > 0 and state.best_epoch >= 0 and state.epoch - state.best_epoch >= patience


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


def _progress(job: Job, epoch: int, skip: int, clock: Clock) -> tqdm:
    """One bar per epoch, left on screen (the loss of its last log step as postfix)."""
    return tqdm(
        clock.timed(DevicePrefetcher(job.loader, job.device, job.cfg.perf.prefetch)),
        total=job.usable_batches - skip,
        desc=f"{job.cfg.train.stage} epoch {epoch + 1}/{job.cfg.train.epochs}",
        disable=not (job.env.is_main and job.cfg.train.progress),
        mininterval=2,
        leave=True,
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------- setup


def setup(cfg: Config) -> tuple[Job, TrainState]:
    """Checks, data, process group, the run directory's lock, then (the first write into the
    run directory) its config.yaml, models, engine, resume, tracker, in that order."""
    env = D.from_env()
    # Whatever can refuse the command fails here, on every rank alike, before any collective
    # and before anything is written.
    checked = preflight(cfg, env.world)
    device = D.device_for(env)
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
    E.init_distributed(env, device)
    # Every rank's preflight (its probe of the run directory's lock included) is over before
    # rank 0 takes the lock: joining a new process group waits for all ranks, but a group made
    # before run() (a caller's own) would not, and a slow rank would see its own job's lock.
    D.barrier()
    run_dir = Path(cfg.train.out_dir)
    lock = _lock_run_dir(env, run_dir)
    try:
        if env.is_main:
            E.remove_stale_temps(run_dir / "checkpoints")  # what a killed save left
            save_resolved(cfg, run_dir)
        return _build(cfg, env, device, objective, stream, checked, lock, steps_per_epoch)
    except BaseException:
        lock.release()
        raise


def _build(
    cfg: Config,
    env: D.DistEnv,
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
    engine = E.build_engine(
        model,
        optim=cfg.optim,
        ds=cfg.deepspeed,
        precision=cfg.train.precision,
        micro_batch=cfg.data.batch_size,
        world=env.world,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
        universal=_reshards(cfg, checked),
    )
    if cfg.perf.compile:
        engine.compile()  # DeepSpeed's wrapper around torch.compile of the student
    state = resume(engine, checked.checkpoint, env.world, _reshards(cfg, checked))
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
    env: D.DistEnv,
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


def _lock_run_dir(env: D.DistEnv, run_dir: Path) -> RunLock:
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
        problem = D.broadcast_object(problem)
    except BaseException:
        lock.release()
        raise
    if error is not None:
        raise error
    if problem:
        raise RunLocked(f"rank 0: {problem}")
    return lock


# ----------------------------------------------------------------------------- preflight


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
        checkpoint = E.find_checkpoint(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints")
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
    """data.streams; 0 (auto): what the resumed checkpoint's run used, else ranks x loader
    workers now. A run keeps it for good: its epochs are the same micro-batches on any number
    of ranks (multieye_dist.data.stream)."""
    if cfg.data.streams:
        return cfg.data.streams
    kept = (saved.get("identity") or {}).get("data.streams")
    if isinstance(kept, int) and kept > 0:
        return kept
    return world * max(cfg.data.num_workers, 1)


def check_teacher(cfg: Config, bank: torch.Tensor) -> None:
    """teacher.checkpoint is an inference export of an OCT teacher over `bank` (its header and
    concept tensor only: the weights are read once, by :func:`build_teacher`)."""
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


def run_identity(
    cfg: Config, world: int | None, bank: torch.Tensor | None, streams: int | None = None
) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint, by the name a
    refusal gives it: the stage, the model (its init file aside), the concept bank's content
    and the batch geometry: the micro-batch, the micro-batches per optimizer step and the
    data's logical streams, not the number of ranks (elastic resume: the optimizer step and
    the epochs stay the same). Kept in every checkpoint's trainer state."""
    identity: dict[str, Any] = {"train.stage": cfg.train.stage}
    identity.update({f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "weights"})
    if bank is not None:
        data = bank.detach().float().contiguous().cpu().numpy().tobytes()
        identity["concepts.bank (content)"] = hashlib.sha256(data).hexdigest()[:16]
    identity["data.batch_size"] = cfg.data.batch_size
    if world is not None:
        identity[PER_STEP] = world * cfg.optim.grad_accum
    if streams is not None:
        identity["data.streams"] = streams
    return identity


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved with `checkpoint` (an error naming the file if unreadable)."""
    try:
        state = json.loads((checkpoint / E.STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{checkpoint / E.STATE_FILE}: cannot read it ({exc})") from None
    return state if isinstance(state, dict) else {}


def check_resume(
    checkpoint: Path, identity: dict[str, Any], state: dict[str, Any], world: int
) -> None:
    """Refuse to resume `checkpoint` with a different model, concept bank or batch geometry,
    naming each difference (a checkpoint from before identities were saved is compared with
    its run's config.yaml, on what that records). Another number of ranks is fine as long as
    an optimizer step stays the same micro-batches (the error says which settings do that);
    a checkpoint from before elastic resume (no global data position) needs its own."""
    saved = state.get("identity")
    if saved is None:
        saved = _identity_from_config(checkpoint.parent.parent / "config.yaml")
    old_world = saved.get(_OLD_WORLD_KEY)
    if not state.get("world") and old_world is not None and old_world != world:
        raise ConfigError(
            f"cannot resume from {checkpoint} on {world} rank(s): it was saved by {old_world} "
            "rank(s) before checkpoints kept a global data position; resume it on "
            f"{old_world} rank(s)"
        )
    per_step = saved.get(PER_STEP)
    if per_step is None and old_world is not None and "optim.grad_accum" in saved:
        per_step = old_world * saved["optim.grad_accum"]
    if per_step is not None and PER_STEP in identity and per_step != identity[PER_STEP]:
        raise ConfigError(_elastic_advice(checkpoint, per_step, identity[PER_STEP], world))
    differ = [
        f"{k} {saved[k]!r} -> {v!r}" for k, v in identity.items() if k in saved and saved[k] != v
    ]
    if differ:
        raise ConfigError(
            f"cannot resume from {checkpoint}: {', '.join(differ)} differ from the run that "
            "saved it; resume with its settings, or start afresh with train.resume=never or "
            "another train.out_dir"
        )


def _elastic_advice(checkpoint: Path, saved: int, now: int, world: int) -> str:
    fits = [w for w in range(1, saved + 1) if saved % w == 0]
    how = (
        f"with {world} rank(s) set optim.grad_accum={saved // world}"
        if saved % world == 0
        else f"{world} rank(s) cannot: use a number of ranks that divides {saved} ({fits})"
    )
    return (
        f"cannot resume from {checkpoint}: its optimizer step takes {saved} micro-batch(es) "
        f"(ranks x optim.grad_accum), this run's {now}; {how}, so that every step trains on "
        "the same samples (or start afresh with train.resume=never or another train.out_dir)"
    )


def _identity_from_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        logger.warning("%s: cannot compare the resumed run with it (%s)", path, exc)
        return {}
    return run_identity(cfg, None, None)


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
    cfg: Config, env: D.DistEnv, objective: Objective, streams: int = 0
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


def _reshards(cfg: Config, checked: Checked) -> bool:
    """Whether the resume goes through DeepSpeed's universal checkpoint: on another number of
    ranks with ZeRO's partitioned optimizer state (bf16 mode partitions its fp32 master
    weights even at ZeRO 0); otherwise every rank's state is whole and loads as it is."""
    partitioned = cfg.deepspeed.zero_stage > 0 or cfg.train.precision == "bf16"
    return checked.resharded and partitioned


def resume(engine, path: Path | None, world: int, universal: bool = False) -> TrainState:
    """The trainer state of checkpoint `path` (after DeepSpeed's own; ``universal``: through
    its universal form), its data position divided among `world` ranks: the epoch's consumed
    micro-batches are global, so a run resumed on other ranks neither repeats nor skips one
    (multieye_dist.data.stream)."""
    if path is None:
        return TrainState(world=world)
    state = TrainState.from_dict(E.load_checkpoint(engine, path, universal=universal))
    if state.step != engine.global_steps:
        raise RuntimeError(
            f"{path}: trainer_state step {state.step} != DeepSpeed's {engine.global_steps}"
        )
    saved_world = state.world or world
    if saved_world != world:
        consumed = state.batch * saved_world  # whole optimizer steps: a multiple of `world`
        if consumed % world:
            raise RuntimeError(f"{path}: {consumed} micro-batches done, not a multiple of {world}")
        logger.info(
            "resuming %d rank(s)' checkpoint on %d: epoch %d at micro-batch %d of each rank "
            "(%d of the epoch consumed)", saved_world, world, state.epoch + 1, consumed // world,
            consumed,
        )  # fmt: skip
        state.batch = consumed // world
    state.world = world
    return state


# ----------------------------------------------------------------------------- logging


def log_train(
    job: Job,
    state: TrainState,
    meter: Meter,
    stats: StreamStats,
    clock: Clock,
    last_step: int,
) -> float | None:
    """Mean loss terms over the interval and over ranks (one small all-reduce); rank 0 logs
    them to the tracker and as one INFO line, and gets the mean loss back (else None). An
    interval whose steps were all skipped (non-finite on every rank alike) has no terms."""
    sums = meter.sums if meter.sums is not None else torch.zeros(0, device=job.device)
    vec = torch.cat(
        [sums.double(), torch.tensor([float(meter.steps)], device=sums.device, dtype=torch.float64)]
    )
    if D.world_size() > 1:
        torch.distributed.all_reduce(vec)  # on the device: NCCL reduces CUDA tensors only
    if not job.env.is_main:
        return None
    host = vec.tolist()
    n = max(host[-1], 1.0)
    elapsed = max(time.perf_counter() - meter.t0, 1e-9)
    terms = {k: host[i] / n for i, k in enumerate(meter.names)}
    values = {f"train/{k}": v for k, v in terms.items()}
    values.update(
        {
            "train/lr": E.current_lr(job.engine),
            "train/epoch": state.epoch + state.batch / job.usable_batches,
            "train/samples_per_s": meter.samples * job.env.world / elapsed,
            "train/data_wait": min(clock.wait / elapsed, 1.0),
            "train/nonfinite_skipped": state.nonfinite,
            "data/bad": stats.bad,
            "data/unmatched_oct": stats.unmatched_oct,
        }
    )
    job.tracker.log(values, step=state.step)
    logger.info("%s", _console_line(job, state, terms, values, clock.eta(state.step, last_step)))
    return terms.get("loss")


def _console_line(
    job: Job, state: TrainState, terms: dict[str, float], values: dict[str, Any], eta: float | None
) -> str:
    """``epoch 2/4 step 40/128 | loss 1.2345 ce 1.1 ... | lr 1.00e-03 | 95.1 pairs/s | data
    wait 12% | ETA 1m30s``: what a person watching the run reads."""
    cfg = job.cfg.train
    total = cfg.epochs * (job.usable_batches // job.cfg.optim.grad_accum)
    loss = " ".join(f"{k} {v:.4f}" for k, v in terms.items()) or "loss - (every step skipped)"
    unit = "pairs/s" if job.objective.partner is not None else "images/s"
    return (
        f"epoch {state.epoch + 1}/{cfg.epochs} step {state.step}/{total} | {loss} | "
        f"lr {values['train/lr']:.2e} | {values['train/samples_per_s']:.1f} {unit} | "
        f"data wait {100 * values['train/data_wait']:.0f}% | ETA {_duration(eta)}"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def evaluate_dev(job: Job, state: TrainState) -> None:
    """Dev metrics; a new best macro-F1 is exported as best.safetensors.

    Predictions that are not finite stop the run with the guard's advice, except in a streak
    of non-finite losses (a diverged run at an epoch end): the evaluation is skipped, and the
    guard, whose count goes on across the epoch boundary, stops the run at its limit."""
    result, problem = _evaluate(job, job.engine.module, "dev", "dev_last")
    if problem is not None:
        if not state.nonfinite_in_row:
            raise TrainingError(f"epoch {state.epoch}: {problem}; {_DIVERGED_ADVICE}")
        logger.warning(
            "epoch %d: dev evaluation skipped: %s, after %d non-finite losses in a row "
            "(optim.max_nonfinite_in_row=%d stops the run)",
            state.epoch,
            problem,
            state.nonfinite_in_row,
            job.cfg.optim.max_nonfinite_in_row,
        )
        return
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


def _evaluate(
    job: Job, model: torch.nn.Module, split: str, records: str | None = None
) -> tuple[dict | None, str | None]:
    """(the result on rank 0, else None; what stops it being scored, on every rank: a
    diverged model's predictions are not finite, which rank 0 finds in the metrics).
    `records`: also keep the per-sample records as ``eval/<records>.records.json``."""
    D.average_batchnorm_stats(job.engine.module)
    problem = None
    try:
        result = _evaluate_split(job, model, split, records)
    except NonFiniteError as exc:
        result, problem = None, f"the model's {split} predictions are not finite ({exc})"
    return result, D.broadcast_object(problem)


def _evaluate_split(
    job: Job, model: torch.nn.Module, split: str, records: str | None = None
) -> dict | None:
    d = job.cfg.data
    keep = None if records is None else job.run_dir / "eval" / f"{records}{RECORDS_SUFFIX}"
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
        records_path=keep,
        concept_findings=bank_concept_findings(job.cfg.concepts.bank, None),
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
            # which finding each concept describes, where the bank says: the concept readout
            "concept_findings": bank_concept_findings(job.cfg.concepts.bank, None),
        }
        export_inference(
            path,
            model,
            job.cfg.model,
            concept_sentences=job.sentences,
            image_size=job.cfg.data.image_size,
            extra=extra,
            class_names=job.stream.fundus.class_names,  # the primary modality's manifest's
        )
    D.barrier()
    return path


def stop(
    job: Job,
    state: TrainState,
    reason: str,
    preempted: bool = False,
    signame: str | None = None,
    pruned: bool = False,
) -> dict[str, Any]:
    logger.info("%s at step %d (checkpoint saved); resume: train.resume=auto", reason, state.step)
    if pruned:  # a final summary: the sweep counts a pruned run as finished, not failed
        best = {"best_epoch": state.best_epoch, "best_dev_f1": state.best_f1}
        job.tracker.summary({"pruned": True, "step": state.step, **best})
    job.tracker.finish()
    summary = {"stopped": True, "preempted": preempted, "step": state.step, "reason": reason}
    if pruned:
        summary.update(pruned=True, best_dev_f1=state.best_f1, best_epoch=state.best_epoch)
    return {**summary, "signal": signame} if signame else summary


def finish(job: Job, state: TrainState) -> dict[str, Any]:
    """Export the last model; score test with the best and the last; write the summary."""
    export(job, state, "last")
    summary: dict[str, Any] = {
        "step": state.step,
        "epochs": state.epoch,  # trained: fewer than train.epochs after an early stop
        "best_epoch": state.best_epoch,
        "best_dev_f1": state.best_f1,
        "nonfinite_skipped": state.nonfinite,
    }
    for name in ("best", "last"):
        path = job.run_dir / f"{name}.safetensors"
        if name == "best" and state.best_epoch < 0:  # every dev evaluation was skipped
            logger.warning("no best model: no dev evaluation was scored (non-finite losses)")
            continue
        model = job.engine.module if name == "last" else load_inference(path)[0].to(job.device)
        result, problem = _evaluate(job, model, "test", f"test_{name}")
        if problem is not None:
            streak = state.nonfinite_in_row
            raise TrainingError(
                f"{name} model: {problem}"
                + (f", after {streak} non-finite losses in a row at the end" if streak else "")
                + f"; {_DIVERGED_ADVICE}"
            )
        if job.env.is_main:
            _write_json(job.run_dir / "eval" / f"test_{name}.json", result)
            summary.update(
                {f"test/{name}/{k}": result[k] for k in ("accuracy", "f1", "auc", "map", "kappa")}
            )
            if result.get("concept_auc") is not None:  # the concept readout (findings data)
                summary[f"test/{name}/concept_auc"] = result["concept_auc"]
            logger.info("test, %s model (%s):\n%s", name, path, format_table(result))
    if job.env.is_main:
        job.tracker.summary(summary)
        job.tracker.log_outputs(step=state.step)  # W&B: eval/*.records.json charts, exports
        if job.cfg.train.plots:  # <run>/plots/*.png; a failure is a warning, not a failed run
            plot_run_safely(job.run_dir)
        _closing_line(job, state)
    job.tracker.finish()
    D.barrier()
    return summary


def _closing_line(job: Job, state: TrainState) -> None:
    run_dir = job.run_dir.resolve()
    last = run_dir / "last.safetensors"
    if state.best_epoch < 0:
        logger.info("done: no dev evaluation was scored; last model %s", last)
        return
    logger.info(
        "done: best dev macro-F1 %.2f at epoch %d -> %s (last model: %s; results: %s)",
        100 * state.best_f1,
        state.best_epoch,
        run_dir / "best.safetensors",
        last,
        run_dir / "eval",
    )
