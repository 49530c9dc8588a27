"""The pieces of training that can be checked without a launch: schedule, environment,
BatchNorm averaging over ranks, checkpoint discovery and safe loading."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from helpers import run_ranks

from multieye_dist.config import DeepSpeedConfig, OptimConfig
from multieye_dist.core import distributed as D
from multieye_dist.train import engine as E
from multieye_dist.train.resume import TrainState
from multieye_dist.train.schedule import lr_at


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    kw = dict(lr=1e-4, min_lr=1e-6, warmup_steps=50, total_steps=1000)
    assert lr_at(0, **kw) == pytest.approx(1e-4 / 50)
    assert lr_at(49, **kw) == pytest.approx(1e-4)
    assert lr_at(50, **kw) == pytest.approx(1e-4)
    mid = 50 + 950 // 2
    assert lr_at(mid, **kw) == pytest.approx(
        1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_at(1000, **kw) == pytest.approx(1e-6) and lr_at(5000, **kw) == pytest.approx(1e-6)
    values = [lr_at(s, **kw) for s in range(50, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(0, lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1e-3)


def test_environment_is_read_and_partial_launches_are_named():
    assert D.from_env({}).world == 1
    env = D.from_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "7"}
    )
    assert (env.rank, env.world, env.local_rank, env.master_addr, env.master_port) == (
        3, 4, 1, "n1", 7,
    )  # fmt: skip
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT missing"):
        D.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        D.from_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        D.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def _bn_ranks(rank: int, world: int) -> None:
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank))
    bn.running_var.fill_(2.0 + rank)
    assert D.average_batchnorm_stats(torch.nn.Sequential(torch.nn.Linear(3, 3), bn)) == 2
    assert torch.allclose(bn.running_mean, torch.full((3,), 0.5))
    assert torch.allclose(bn.running_var, torch.full((3,), 2.5))


@pytest.mark.slow
def test_batchnorm_statistics_are_averaged_over_ranks():
    run_ranks(_bn_ranks, 2)


def test_trainer_state_round_trips_and_ignores_unknown_keys():
    s = TrainState(epoch=3, batch=5, step=77, best_f1=0.5, run_id="abc")
    from dataclasses import asdict

    assert TrainState.from_dict({**asdict(s), "future_key": 1}) == s
    # A checkpoint from before the rename kept the tracker's run id under its old key.
    old = {k: v for k, v in asdict(s).items() if k != "run_id"}
    assert TrainState.from_dict({**old, "wandb_run_id": "abc"}) == s


def test_find_checkpoint_names_what_is_wrong(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert E.find_checkpoint("auto", ckpt) is None and E.find_checkpoint("never", ckpt) is None
    (ckpt / "step00000010").mkdir(parents=True)
    (ckpt / "latest").write_text("step00000010")
    with pytest.raises(FileNotFoundError, match="trainer_state.json is missing"):
        E.find_checkpoint("auto", ckpt)  # a save that never completed
    (ckpt / "step00000010" / E.STATE_FILE).write_text("{}")
    assert E.find_checkpoint("auto", ckpt) == ckpt / "step00000010"
    assert E.find_checkpoint(str(ckpt / "step00000010"), ckpt) == ckpt / "step00000010"
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        E.find_checkpoint(str(tmp_path), ckpt)


class _Payload:
    """Stands for anything a pickle could smuggle into a checkpoint."""


def test_checkpoint_loads_refuse_arbitrary_pickles(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    safe = E._safe_checkpoint_engine(TorchCheckpointEngine())
    good = tmp_path / "good.pt"
    safe.save({"w": torch.ones(2), "step": 3}, str(good))
    assert safe.load(str(good))["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt"]  # no temporary file left
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "x": _Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        safe.load(str(bad))


def test_deepspeed_config_follows_the_sections():
    optim = OptimConfig(grad_accum=4)
    cfg = E.ds_config(
        optim,
        DeepSpeedConfig(zero_stage=2, extra={"gradient_clipping": 1.0}),
        "autocast-bf16",
        micro_batch=8,
        world=2,
    )
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg
    assert E.ds_config(optim, DeepSpeedConfig(), "bf16", 8, 1)["bf16"] == {"enabled": True}
    fp32 = E.ds_config(optim, DeepSpeedConfig(), "fp32", 8, 1)
    assert "bf16" not in fp32 and "torch_autocast" not in fp32


def test_prune_checkpoints_keeps_the_newest_and_latest(tmp_path):
    import json

    from multieye_dist.train.engine import LATEST, STATE_FILE, prune_checkpoints

    for step in (5, 8, 16, 100):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        (d / "model.pt").write_bytes(b"x")
        (d / STATE_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "step00000200").mkdir()  # incomplete (no trainer state): never counted
    (tmp_path / LATEST).write_text("step00000008")  # e.g. a resume from an older one
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [d.name for d in deleted] == ["step00000005"]  # 100 and 16 are newest, 8 is latest
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["step00000008", "step00000016", "step00000100", "step00000200"]
    (tmp_path / LATEST).write_text("step00000100")
    assert [d.name for d in prune_checkpoints(tmp_path, keep=1)] == ["step00000016", "step00000008"]
