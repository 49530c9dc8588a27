"""What a training leaves and reports: the train log (tracker values and the console line,
from :class:`Meter` and :class:`Clock`), the dev and test evaluations and their JSON, the
checkpoints (:func:`save`), the inference exports best/last.safetensors (:func:`export_model`)
and the closing line. :class:`TrainingError`: a diverged run that cannot go on.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multieye_dist.config import to_dict
from multieye_dist.core.atomic import write_text
from multieye_dist.core.distributed import (
    average_batchnorm_stats,
    barrier,
    broadcast_object,
    world_size,
)
from multieye_dist.data.batch import Batch, StreamStats
from multieye_dist.data.remote import resolve_shards
from multieye_dist.model.checkpoint import export_inference, load_inference
from multieye_dist.model.concept_model import param_dtype
from multieye_dist.track.metrics import NonFiniteError, format_table
from multieye_dist.track.records import (
    CHECKPOINTS_DIR,
    EVAL_DIR,
    RECORDS_SUFFIX,
    eval_path,
    export_path,
)
from multieye_dist.train.engine import current_lr, save_checkpoint
from multieye_dist.train.evaluation import evaluate_split
from multieye_dist.train.objectives import Terms, bank_concept_findings
from multieye_dist.train.resume import TrainState
from multieye_dist.train.setup import Job

logger = logging.getLogger(__name__)

DIVERGED_ADVICE = "lower optim.lr, check the data, or try train.precision=fp32"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


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


# ----------------------------------------------------------------------------- the train log


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
    if world_size() > 1:
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
            "train/lr": current_lr(job.engine),
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


# ----------------------------------------------------------------------------- evaluation


def evaluate_dev(job: Job, state: TrainState) -> None:
    """Dev metrics; a new best macro-F1 is exported as best.safetensors.

    Predictions that are not finite stop the run with the guard's advice, except in a streak
    of non-finite losses (a diverged run at an epoch end): the evaluation is skipped, and the
    guard, whose count goes on across the epoch boundary, stops the run at its limit."""
    result, problem = _evaluate(job, job.engine.module, "dev", "dev_last")
    if problem is not None:
        if not state.nonfinite_in_row:
            raise TrainingError(f"epoch {state.epoch}: {problem}; {DIVERGED_ADVICE}")
        logger.warning(
            "epoch %d: dev evaluation skipped: %s, after %d non-finite losses in a row "
            "(optim.max_nonfinite_in_row=%d stops the run)",
            state.epoch,
            problem,
            state.nonfinite_in_row,
            job.cfg.optim.max_nonfinite_in_row,
        )
        return
    f1 = broadcast_object(result["f1"] if result else None)
    if f1 > state.best_f1:
        state.best_f1, state.best_epoch = f1, state.epoch
        export_model(job, state, "best")
    if job.env.is_main:
        job.tracker.log_eval(result, prefix="dev/", step=state.step)
        _write_json(eval_path(job.run_dir, f"dev_epoch{state.epoch:03d}"), result)
        logger.info(
            "epoch %d: dev macro-F1 %.2f  acc %.2f  (best %.2f at epoch %d)",
            state.epoch,
            100 * f1,
            100 * result["accuracy"],
            100 * state.best_f1,
            state.best_epoch,
        )


def score_test(job: Job, state: TrainState) -> dict[str, Any]:
    """Test scores of the best and the last model (rank 0's, written as eval/test_<name>.json
    and logged as a table; other ranks get {}), for the run's summary."""
    scores: dict[str, Any] = {}
    for name in ("best", "last"):
        path = export_path(job.run_dir, name)
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
                + f"; {DIVERGED_ADVICE}"
            )
        if job.env.is_main:
            _write_json(eval_path(job.run_dir, f"test_{name}"), result)
            scores.update(
                {f"test/{name}/{k}": result[k] for k in ("accuracy", "f1", "auc", "map", "kappa")}
            )
            if result.get("concept_auc") is not None:  # the concept readout (findings data)
                scores[f"test/{name}/concept_auc"] = result["concept_auc"]
            logger.info("test, %s model (%s):\n%s", name, path, format_table(result))
    return scores


def _evaluate(
    job: Job, model: torch.nn.Module, split: str, records: str | None = None
) -> tuple[dict | None, str | None]:
    """(the result on rank 0, else None; what stops it being scored, on every rank: a
    diverged model's predictions are not finite, which rank 0 finds in the metrics).
    `records`: also keep the per-sample records as ``eval/<records>.records.json``."""
    average_batchnorm_stats(job.engine.module)
    problem = None
    try:
        result = _evaluate_split(job, model, split, records)
    except NonFiniteError as exc:
        result, problem = None, f"the model's {split} predictions are not finite ({exc})"
    return result, broadcast_object(problem)


def _evaluate_split(
    job: Job, model: torch.nn.Module, split: str, records: str | None = None
) -> dict | None:
    d = job.cfg.data
    keep = None if records is None else eval_path(job.run_dir, records, RECORDS_SUFFIX)
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
    """A checkpoint of every rank (collective): DeepSpeed's state and the trainer state."""
    average_batchnorm_stats(job.engine.module)
    save_checkpoint(
        job.engine,
        job.run_dir / CHECKPOINTS_DIR,
        f"step{state.step:08d}",
        state.to_dict(),
        keep=job.cfg.train.keep_checkpoints,
    )


def export_model(job: Job, state: TrainState, name: str) -> Path:
    """``<run>/<name>.safetensors`` (name: best or last), the model's inference export (rank
    0): fp32 weights, the resolved config and where it came from."""
    path = export_path(job.run_dir, name)
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
    barrier()
    return path


def closing_line(job: Job, state: TrainState) -> None:
    """The run's last line (rank 0): its best dev macro-F1 and where its models and results
    are."""
    run_dir = job.run_dir.resolve()
    last = export_path(run_dir, "last")
    if state.best_epoch < 0:
        logger.info("done: no dev evaluation was scored; last model %s", last)
        return
    logger.info(
        "done: best dev macro-F1 %.2f at epoch %d -> %s (last model: %s; results: %s)",
        100 * state.best_f1,
        state.best_epoch,
        export_path(run_dir, "best"),
        last,
        run_dir / EVAL_DIR,
    )
