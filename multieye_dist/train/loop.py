"""Training on DeepSpeed ranks: the OCT teacher (stage 1) and the fundus student (stage 2).

``run(cfg)`` is the whole job; every rank calls it (torchrun, the deepspeed launcher or Slurm set
the environment, :mod:`multieye_dist.core.distributed`). This module is the loop: the epochs,
:func:`train_step`, and how a run ends (:func:`stop`, :func:`finish`). The job is checked by
:mod:`~multieye_dist.train.preflight`, built by :mod:`~multieye_dist.train.setup` and resumed by
:mod:`~multieye_dist.train.resume`; :mod:`~multieye_dist.train.outputs` writes what it leaves.
The student is the DeepSpeed engine; the teacher is a frozen model outside it. Rank 0 writes
the run directory::

    <train.out_dir>/config.yaml            resolved config
    <train.out_dir>/checkpoints/<tag>/     DeepSpeed checkpoints (+ trainer_state.json), latest
    <train.out_dir>/best.safetensors       inference export of the best dev macro-F1 model
    <train.out_dir>/last.safetensors       inference export of the final model
    <train.out_dir>/eval/*.json            dev/test results (release metrics)
    <train.out_dir>/metrics.jsonl, summary.json, run_id.txt, ...  (multieye_dist.track.tracking)
    <train.out_dir>/train.lock             held while a training runs (multieye_dist.core.runlock)

Nothing is written there before the command is fully checked
(:func:`~multieye_dist.train.preflight.preflight`): a refused command leaves a finished run's
directory exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from multieye_dist.config import Config
from multieye_dist.core.distributed import barrier, broadcast_object, step_flags
from multieye_dist.data.batch import Batch
from multieye_dist.data.prefetch import DevicePrefetcher
from multieye_dist.track.plots import plot_run_safely
from multieye_dist.train.objectives import Terms
from multieye_dist.train.outputs import (
    DIVERGED_ADVICE,
    Clock,
    Meter,
    TrainingError,
    closing_line,
    evaluate_dev,
    export_model,
    log_train,
    save,
    score_test,
)
from multieye_dist.train.resume import TrainState
from multieye_dist.train.setup import Job, data_classes, setup
from multieye_dist.train.signals import Interrupted, StopFlag, handle_stop_signals

logger = logging.getLogger(__name__)

# What a stop signal of the `multieye-dist train` command ends with (SIGUSR2 is Slurm's: requeue).
_EXIT_SIGNALS = ("SIGTERM", "SIGINT")


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
    """The epochs of :func:`run`, after :func:`setup`: optimizer steps, then at an epoch's end
    (every train.eval_every_epochs, and the last) a dev evaluation, then a checkpoint."""
    meter, clock, stopping = Meter(), Clock(state.step), False
    after = cfg.train.stop_after_steps
    step_limit = None if after is None else state.step + after
    steps_per_epoch = job.usable_batches // cfg.optim.grad_accum
    last_step = cfg.train.epochs * steps_per_epoch if step_limit is None else step_limit
    for epoch in range(state.epoch, cfg.train.epochs):
        job.stream.set_epoch(epoch, skip=state.batch)
        bar = _progress(job, epoch, state.batch, clock)
        for batch in bar:
            if state.batch >= job.usable_batches:
                break  # the micro-batches left over by gradient accumulation
            asked = stop_requested is not None and stop_requested()
            terms, asked_anywhere = train_step(job, batch, asked)
            stopping = stopping or asked_anywhere  # every rank sees the same reduced flag
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
                return _stop_as_asked(job, state, stop_requested)
            if step_limit is not None and state.step >= step_limit:
                return stop(job, state, f"stopped after {after} steps")
            if state.step % cfg.train.checkpoint_every_steps == 0:
                save(job, state)
        bar.close()
        t_end = time.perf_counter()
        state.epoch, state.batch = epoch + 1, 0
        if state.epoch == cfg.train.epochs or state.epoch % cfg.train.eval_every_epochs == 0:
            evaluate_dev(job, state)
            if _no_better(cfg, state):  # every rank: best_epoch is the broadcast F1's
                _log_early_stop(cfg, state)
                save(job, state)
                break
            if _pruned(job, state, on_dev_f1):
                return stop(job, state, f"pruned by the sweep at epoch {state.epoch}", pruned=True)
        save(job, state)
        clock.pause(time.perf_counter() - t_end, meter)
    return finish(job, state)


def train_step(job: Job, batch: Batch, asked: bool = False) -> tuple[Terms | None, bool]:
    """Seed, objective, finite check, backward and (at accumulation boundaries) the optimizer
    step. Returns the terms to log (``loss`` and the objective's, on the device), or None when
    the loss was not finite on some rank (nothing is applied then), and whether some rank
    `asked` to stop. The finite check and the stop request travel in one all-reduce: the
    step's only host sync (the gate and everything else stay on the device)."""
    engine = job.engine
    torch.manual_seed(_step_seed(job, engine.global_steps))  # dropout etc.: a function of step
    job.objective.set_step(engine.global_steps)
    batch = batch.to(job.device, non_blocking=True)  # no-op when the prefetcher moved it
    batch = job.prepare(batch)  # augmentation on the device (data.augment_on=device)
    total, terms = job.objective(engine, job.teacher, batch)
    finite, asked_anywhere = step_flags(total, asked)
    if not finite:
        return None, asked_anywhere
    engine.backward(total)
    engine.step()
    return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}, asked_anywhere


def _step_seed(job: Job, step: int) -> int:
    return (job.cfg.train.seed * 1_000_003 + step) * 4099 + job.env.rank


def _count_nonfinite(job: Job, state: TrainState, terms: Terms | None) -> None:
    """The guard: a step whose loss was not finite is counted (and skipped); too many in a
    row stop the run."""
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
            f"{limit}) at epoch {state.epoch}, batch {state.batch}: {DIVERGED_ADVICE}"
        )


def _progress(job: Job, epoch: int, skip: int, clock: Clock) -> tqdm:
    """The epoch's batches, on the device ahead of their step, timed by `clock`: one bar per
    epoch, left on screen (the loss of its last log step as postfix)."""
    return tqdm(
        clock.timed(DevicePrefetcher(job.loader, job.device, job.cfg.perf.prefetch)),
        total=job.usable_batches - skip,
        desc=f"{job.cfg.train.stage} epoch {epoch + 1}/{job.cfg.train.epochs}",
        disable=not (job.env.is_main and job.cfg.train.progress),
        mininterval=2,
        leave=True,
        dynamic_ncols=True,
    )


def _no_better(cfg: Config, state: TrainState) -> bool:
    """train.early_stop_evals dev evaluations in a row without a better macro-F1."""
    patience = cfg.train.early_stop_evals * cfg.train.eval_every_epochs
    return patience > 0 and state.best_epoch >= 0 and state.epoch - state.best_epoch >= patience


def _log_early_stop(cfg: Config, state: TrainState) -> None:
    logger.info(
        "early stop at epoch %d: dev macro-F1 not better than %.2f (epoch %d) for "
        "%d evaluations (train.early_stop_evals)",
        state.epoch,
        100 * state.best_f1,
        state.best_epoch,
        cfg.train.early_stop_evals,
    )


def _pruned(job: Job, state: TrainState, on_dev_f1: Callable[[int, float], bool] | None) -> bool:
    """Whether the sweep's pruner stops the run: rank 0 asks it, every rank obeys the answer."""
    if on_dev_f1 is None:
        return False
    prune = job.env.is_main and on_dev_f1(state.epoch, state.best_f1)
    return broadcast_object(bool(prune))


# ----------------------------------------------------------------------------- the end


def _stop_as_asked(
    job: Job, state: TrainState, stop_requested: Callable[[], bool] | None
) -> dict[str, Any]:
    """:func:`stop` on a stop request: by the command's own signal handler (the run then exits
    with the signal), else the caller's (preemption, a time limit)."""
    name = getattr(stop_requested, "name", None)
    if name in _EXIT_SIGNALS:
        return stop(job, state, f"stopped by {name}", signame=name)
    return stop(job, state, "stop requested (preemption, time limit or a signal)", preempted=True)


def stop(
    job: Job,
    state: TrainState,
    reason: str,
    preempted: bool = False,
    signame: str | None = None,
    pruned: bool = False,
) -> dict[str, Any]:
    """End the run before its last epoch: a checkpoint to resume from, then the summary."""
    save(job, state)
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
    export_model(job, state, "last")
    summary: dict[str, Any] = {
        "step": state.step,
        "epochs": state.epoch,  # trained: fewer than train.epochs after an early stop
        "best_epoch": state.best_epoch,
        "best_dev_f1": state.best_f1,
        "nonfinite_skipped": state.nonfinite,
    }
    summary.update(score_test(job, state))  # rank 0's scores
    if job.env.is_main:
        job.tracker.summary(summary)
        job.tracker.log_outputs(step=state.step)  # W&B: eval/*.records.json charts, exports
        if job.cfg.train.plots:  # <run>/plots/*.png; a failure is a warning, not a failed run
            plot_run_safely(job.run_dir)
        closing_line(job, state)
    job.tracker.finish()
    barrier()
    return summary
