"""The trainer state a checkpoint keeps (trainer_state.json): its versioned format with short
keys, and the unversioned format of earlier checkpoints (sentences as identity keys), which
must keep resuming to the same state and identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from multieye_dist.config import ConfigError, load_config
from multieye_dist.train.engine import FILES_KEY, STATE_FILE
from multieye_dist.train.resume import (
    BANK,
    LABELS,
    PER_STEP,
    STATE_VERSION,
    TrainState,
    check_resume,
    checkpoint_state,
    run_identity,
)


def _cfg():
    return load_config(None, ["data.batch_size=8", "optim.grad_accum=2", "train.stage=distill"])


def _bank(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))


def _unversioned_identity(cfg, world: int, bank: torch.Tensor, streams: int) -> dict:
    """run_identity as the code before the versioned format wrote it, keyed by sentences."""
    identity = {"train.stage": cfg.train.stage}
    identity.update({f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "weights"})
    data = bank.detach().float().contiguous().cpu().numpy().tobytes()
    identity["concepts.bank (content)"] = hashlib.sha256(data).hexdigest()[:16]
    identity["data.batch_size"] = cfg.data.batch_size
    identity["micro-batches per step (ranks x optim.grad_accum)"] = world * cfg.optim.grad_accum
    identity["data.streams"] = streams
    return identity


def _write(tmp_path: Path, state: dict) -> Path:
    """A checkpoint directory whose trainer_state.json is `state` as the engine commits it."""
    ckpt = tmp_path / "run" / "checkpoints" / "step00000012"
    ckpt.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": 123}
    (ckpt / STATE_FILE).write_text(json.dumps({**state, FILES_KEY: files}, indent=1))
    return ckpt


def test_an_unversioned_trainer_state_loads_as_the_versioned_one(tmp_path):
    cfg, bank = _cfg(), _bank()
    fields = dict(epoch=1, batch=6, world=2, step=12, best_f1=0.25, best_epoch=0, nonfinite=1)
    # Exactly what the trainer saved before the format had a version: asdict(TrainState) with
    # the identity's sentence keys (and, older still, the run id under its W&B-era key).
    old = {**fields, "nonfinite_in_row": 0, "wandb_run_id": "abc123"}
    old["identity"] = _unversioned_identity(cfg, 2, bank, streams=4)
    new = TrainState(**fields, run_id="abc123", identity=run_identity(cfg, 2, bank, 4))

    assert TrainState.from_dict(old) == new
    assert TrainState.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    read = checkpoint_state(_write(tmp_path, old))  # what preflight reads: current keys
    assert read["version"] == STATE_VERSION and read["run_id"] == "abc123"
    assert read["identity"] == new.identity
    assert read["identity"][PER_STEP] == 4 and BANK in read["identity"]
    # The old checkpoint resumes where its settings are the same, and is refused, in words,
    # where they are not.
    ckpt = tmp_path / "run" / "checkpoints" / "step00000012"
    check_resume(ckpt, run_identity(cfg, 2, bank, 4), old, world=2)
    with pytest.raises(ConfigError, match=r"concepts\.bank \(content\) '[0-9a-f]{16}' -> "):
        check_resume(ckpt, run_identity(cfg, 2, _bank(1), 4), old, world=2)
    with pytest.raises(ConfigError, match="takes 4 micro-batch"):
        check_resume(ckpt, run_identity(cfg, 3, bank, 4), old, world=3)


def test_a_checkpoint_from_before_elastic_resume_keeps_its_ranks(tmp_path):
    """Older still: no global data position, the ranks in the identity as a sentence key."""
    cfg = _cfg()
    identity = {"data.batch_size": 8, "optim.grad_accum": 2, "ranks (WORLD_SIZE)": 2}
    old = {"epoch": 0, "batch": 3, "step": 1, "identity": identity}
    ckpt = _write(tmp_path, old)
    check_resume(ckpt, run_identity(cfg, 2, None), checkpoint_state(ckpt), world=2)
    with pytest.raises(ConfigError, match=r"saved by 2 rank\(s\) before"):
        check_resume(ckpt, run_identity(cfg, 1, None), checkpoint_state(ckpt), world=1)
    assert TrainState.from_dict(old).world == 0  # its position is per rank


def test_the_versioned_trainer_state_round_trips_with_short_keys(tmp_path):
    cfg, bank = _cfg(), _bank()
    state = TrainState(
        epoch=2, batch=4, world=2, step=30, best_f1=0.5, best_epoch=1, nonfinite=3,
        nonfinite_in_row=1, run_id="r1", identity=run_identity(cfg, 2, bank, 4),
    )  # fmt: skip
    saved = state.to_dict()
    assert saved["version"] == STATE_VERSION
    assert set(saved) == {"version", *asdict(state)}
    # Short keys that a reworded message cannot change: identifiers and config keys.
    for key in [*saved, *saved["identity"]]:
        assert key.replace(".", "_").isidentifier(), key
    assert set(LABELS) >= {PER_STEP, BANK}
    ckpt = _write(tmp_path, saved)
    assert TrainState.from_dict(checkpoint_state(ckpt)) == state
    check_resume(ckpt, run_identity(cfg, 2, bank, 4), checkpoint_state(ckpt), world=2)
    other = load_config(None, ["data.batch_size=4", "optim.grad_accum=2", "train.stage=distill"])
    with pytest.raises(ConfigError, match=r"data\.batch_size 8 -> 4 differ"):
        check_resume(ckpt, run_identity(other, 2, bank, 4), checkpoint_state(ckpt), world=2)


def test_a_trainer_state_of_a_newer_version_is_refused_naming_the_file(tmp_path):
    ckpt = _write(tmp_path, {**TrainState(step=1).to_dict(), "version": STATE_VERSION + 1})
    newer = rf"{STATE_FILE}: trainer state version {STATE_VERSION + 1}: this multieye-dist"
    with pytest.raises(ValueError, match=newer):
        checkpoint_state(ckpt)
