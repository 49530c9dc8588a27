"""The trainer state a checkpoint keeps (``trainer_state.json``) and resuming from it: what a
resumed run must share with the run that saved it (:func:`run_identity`), the refusals of a
resume that changes it (:func:`check_resume`), and the state restored on any number of ranks.

The state's format is versioned (:data:`STATE_VERSION`) and keyed by short names that do not
change when a message is reworded: :class:`TrainState`'s fields, and in its ``identity``
config keys plus :data:`PER_STEP` and :data:`BANK` (:data:`LABELS` says what a refusal calls
them). A state without ``version`` (0) is read too: :func:`current_state` renames its keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from multieye_dist.config import Config, ConfigError, load_config
from multieye_dist.track.records import CONFIG_FILE, OLD_RUN_ID_KEY
from multieye_dist.train.engine import STATE_FILE, load_checkpoint

logger = logging.getLogger(__name__)

# The version of trainer_state.json's format this code writes; a state without one is 0.
STATE_VERSION = 1
# run_identity's keys that are not config keys: the micro-batches of an optimizer step (ranks x
# optim.grad_accum), the concept bank's content, and (a checkpoint from before elastic resume
# only) its number of ranks.
PER_STEP = "per_step"
BANK = "bank"
OLD_WORLD = "world"
# What a refusal calls those keys (version 0 keyed the identity by these words).
LABELS = {
    PER_STEP: "micro-batches per step (ranks x optim.grad_accum)",
    BANK: "concepts.bank (content)",
    OLD_WORLD: "ranks (WORLD_SIZE)",
}
_VERSION0_IDENTITY = {label: key for key, label in LABELS.items()}


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
        """The state saved as `d`, by this version or an earlier one (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in current_state(d).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint saves: the fields and the format's version."""
        return {"version": STATE_VERSION, **asdict(self)}


def current_state(d: dict[str, Any]) -> dict[str, Any]:
    """The trainer state `d`, saved by any version, in this version's keys (other keys kept).
    A state from a newer version is refused (its keys may mean other things)."""
    version = d.get("version", 0)
    if not isinstance(version, int) or not 0 <= version <= STATE_VERSION:
        raise ValueError(
            f"trainer state version {version!r}: this multieye-dist reads versions up to "
            f"{STATE_VERSION}; resume it with the version that saved it"
        )
    if version == 0:
        d = dict(d)
        if OLD_RUN_ID_KEY in d:  # a checkpoint from before the tracker's rename
            old = d.pop(OLD_RUN_ID_KEY)
            d.setdefault("run_id", old)
        if isinstance(d.get("identity"), dict):
            d["identity"] = {_VERSION0_IDENTITY.get(k, k): v for k, v in d["identity"].items()}
    return {**d, "version": STATE_VERSION}


def label(key: str) -> str:
    """How a refusal names the identity key `key` (a config key names itself)."""
    return LABELS.get(key, key)


def run_identity(
    cfg: Config, world: int | None, bank: torch.Tensor | None, streams: int | None = None
) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint: the stage, the
    model (its init file aside), the concept bank's content and the batch geometry: the
    micro-batch, the micro-batches per optimizer step and the data's logical streams, not the
    number of ranks (elastic resume: the optimizer step and the epochs stay the same). Kept in
    every checkpoint's trainer state, keyed by config keys, :data:`PER_STEP` and :data:`BANK`."""
    identity: dict[str, Any] = {"train.stage": cfg.train.stage}
    identity.update({f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "weights"})
    if bank is not None:
        data = bank.detach().float().contiguous().cpu().numpy().tobytes()
        identity[BANK] = hashlib.sha256(data).hexdigest()[:16]
    identity["data.batch_size"] = cfg.data.batch_size
    if world is not None:
        identity[PER_STEP] = world * cfg.optim.grad_accum
    if streams is not None:
        identity["data.streams"] = streams
    return identity


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved with `checkpoint`, in this version's keys (an error naming the
    file if unreadable)."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(state, dict):
        return {}
    try:
        return current_state(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def check_resume(
    checkpoint: Path, identity: dict[str, Any], state: dict[str, Any], world: int
) -> None:
    """Refuse to resume `checkpoint` with a different model, concept bank or batch geometry,
    naming each difference (a checkpoint from before identities were saved is compared with
    its run's config.yaml, on what that records). Another number of ranks is fine as long as
    an optimizer step stays the same micro-batches (the error says which settings do that);
    a checkpoint from before elastic resume (no global data position) needs its own."""
    state = current_state(state)
    saved = state.get("identity")
    if saved is None:
        saved = _identity_from_config(checkpoint.parent.parent / CONFIG_FILE)
    old_world = saved.get(OLD_WORLD)
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
        f"{label(k)} {saved[k]!r} -> {v!r}"
        for k, v in identity.items()
        if k in saved and saved[k] != v
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


def universal_resume(cfg: Config, resharded: bool) -> bool:
    """Whether the resume goes through DeepSpeed's universal checkpoint: on another number of
    ranks (`resharded`) with ZeRO's partitioned optimizer state (bf16 mode partitions its fp32
    master weights even at ZeRO 0); otherwise every rank's state is whole and loads as it is."""
    partitioned = cfg.deepspeed.zero_stage > 0 or cfg.train.precision == "bf16"
    return resharded and partitioned


def resume(engine, path: Path | None, world: int, universal: bool = False) -> TrainState:
    """The trainer state of checkpoint `path` (after DeepSpeed's own; ``universal``: through
    its universal form), its data position divided among `world` ranks: the epoch's consumed
    micro-batches are global, so a run resumed on other ranks neither repeats nor skips one
    (multieye_dist.data.stream)."""
    if path is None:
        return TrainState(world=world)
    state = TrainState.from_dict(load_checkpoint(engine, path, universal=universal))
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
