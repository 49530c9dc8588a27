"""Elastic resume: a run checkpointed on W ranks resumes on W' != W.

The stream's global position (tests on the shards alone): an epoch is the same sequence of
micro-batches on any number of ranks and loader workers once its logical streams are fixed, and
a resume at a step boundary on other ranks yields exactly the micro-batches not yet consumed.
The trainer (real DeepSpeed ZeRO 1 and 2 on gloo ranks): 2 -> 1 and 1 -> 3 ranks continue the
uninterrupted run's losses, learning rate and sample keys, step by step. The checks that refuse
an impossible resume name the settings that would make it possible.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import free_port, run_ranks, tiny_overrides, train_losses

from multieye_dist.config import ConfigError, DataConfig, load_config
from multieye_dist.data.stream import PairedTrainStream, ShardSet, StreamConfig, make_loader
from multieye_dist.track.records import read_metrics

CFG = StreamConfig.from_data(
    DataConfig(),
    samples_per_epoch=96,
    batch_size=4,
    image_size=32,
    pool_size=4,
    augment=False,
    augment_on="cpu",
    streams=4,
)


def _global_batches(
    d: Path, cfg: StreamConfig, world: int, workers: int, epoch: int = 1, skip: int = 0
) -> dict[int, list[str]]:
    """{global micro-batch index: its fundus and partner keys} of `world` ranks from `skip`."""
    out = {}
    for rank in range(world):
        fundus, oct_ = (ShardSet.from_manifest(d, m, "train") for m in ("fundus", "oct"))
        ds = PairedTrainStream(fundus, oct_, cfg, rank=rank, world=world)
        ds.set_epoch(epoch, skip=skip)
        for p, b in enumerate(make_loader(ds, workers), start=skip):
            out[p * world + rank] = b.keys + b.partner_keys
    return out


@pytest.mark.slow
def test_an_epoch_is_the_same_micro_batches_on_any_ranks_and_workers(shards):
    want = _global_batches(shards, CFG, world=1, workers=0)
    assert len(want) == 96 // 4
    for world, workers in ((2, 0), (4, 1), (3, 2)):
        got = _global_batches(shards, CFG, world, workers)
        common = sorted(set(got) & set(want))  # the last partial row of ranks is not yielded
        assert len(common) == (96 // world // 4) * world
        assert [got[j] for j in common] == [want[j] for j in common], (world, workers)
    # Another epoch, or other streams, are other micro-batches (the check above can fail).
    assert _global_batches(shards, CFG, 1, 0, epoch=2) != want
    assert _global_batches(shards, replace(CFG, streams=2), 1, 0) != want


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 3), (2, 3)])
def test_resuming_on_other_ranks_yields_the_rest_of_the_epoch(shards, before, after):
    """Stopped after 2 optimizer steps of 6 micro-batches (before x grad_accum), resumed on
    `after` ranks: the consumed and the remaining micro-batches are the epoch, none twice."""
    want = _global_batches(shards, CFG, world=1, workers=0)
    consumed = 2 * 6
    rest = _global_batches(shards, CFG, world=after, workers=2, skip=consumed // after)
    first = _global_batches(shards, CFG, world=before, workers=1)
    done = {j: first[j] for j in range(consumed)}
    assert set(done) | set(rest) == set(want) and not set(done) & set(rest)
    assert {**done, **rest} == want
    keys = Counter(k for b in (*done.values(), *rest.values()) for k in b)
    assert keys == Counter(k for b in want.values() for k in b)


# ----------------------------------------------------------------------------- the trainer


def _train_ranks(rank: int, world: int, overrides: list[str], keys_dir: str) -> None:
    """One rank of `multieye-dist train`, recording the keys of every micro-batch it trains on.
    run_ranks made the gloo group, which DeepSpeed joins; the launcher's variables (as torchrun
    sets them) tell the trainer its place."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    import multieye_dist.train.loop as T

    step = T.train_step
    log = Path(keys_dir) / f"rank{rank}.jsonl"

    def recording(job, batch, stop=False):
        with log.open("a") as fh:
            fh.write(json.dumps([job.engine.global_steps, batch.keys]) + "\n")
        return step(job, batch, stop)

    T.train_step = recording
    T.run(load_config(None, overrides))


def _launch(world: int, overrides: list[str], keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    run_ranks(_train_ranks, world, overrides, str(keys_dir), timeout=300)


def _keys_by_step(keys_dir: Path) -> dict[int, Counter]:
    """{optimizer step (1-based): Counter of the sample keys of its micro-batches}."""
    out: dict[int, Counter] = {}
    for f in keys_dir.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            done, keys = json.loads(line)
            out.setdefault(done + 1, Counter()).update(keys)
    return out


def _elastic(shards, tmp_path, before: int, after: int, zero: int, stop: int) -> None:
    per_step = max(before, after) if max(before, after) % min(before, after) == 0 else 6
    common = (
        "loss.name=fundus-only", "data.batch_size=4", f"data.samples_per_epoch={4 * 4 * per_step}",
        "train.epochs=2", f"deepspeed.zero_stage={zero}", f"train.checkpoint_every_steps={stop}",
        "train.keep_checkpoints=0", "optim.lr=3e-3",
    )  # fmt: skip
    full = tmp_path / "full"
    _launch(
        before,
        tiny_overrides(shards, full, *common, f"optim.grad_accum={per_step // before}"),
        tmp_path / "keys-full",
    )
    # The resumed run starts from a copy of the uninterrupted run's checkpoint at `stop`.
    resumed = tmp_path / "resumed"
    tag = f"step{stop:08d}"
    shutil.copytree(full / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text(tag)
    _launch(
        after,
        tiny_overrides(shards, resumed, *common, f"optim.grad_accum={per_step // after}"),
        tmp_path / "keys-resumed",
    )
    want, got = train_losses(full), train_losses(resumed)
    last = 2 * 4
    assert sorted(want) == list(range(1, last + 1))
    assert sorted(got) == list(range(stop + 1, last + 1))  # no step lost or repeated
    for s in got:  # the same samples and weights; only the reduction order differs
        assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-6), s
    lr = {r["step"]: r["train/lr"] for r in read_metrics(full) if "train/lr" in r}
    lr_resumed = {r["step"]: r["train/lr"] for r in read_metrics(resumed) if "train/lr" in r}
    assert lr_resumed == pytest.approx({s: lr[s] for s in lr_resumed}, rel=1e-9)
    # The samples: every step of the resumed run trains on the uninterrupted run's samples, so
    # each epoch's keys are exact (none repeated, none skipped).
    keys_full, keys_resumed = (
        _keys_by_step(tmp_path / "keys-full"),
        _keys_by_step(tmp_path / "keys-resumed"),
    )
    assert sorted(keys_resumed) == list(range(stop + 1, last + 1))
    for s in keys_resumed:
        assert keys_resumed[s] == keys_full[s], s
    epoch1 = sum((keys_full[s] for s in range(1, 5)), Counter())
    mixed = sum((keys_full[s] for s in range(1, stop + 1)), Counter()) + sum(
        (keys_resumed[s] for s in range(stop + 1, 5)), Counter()
    )
    assert mixed == epoch1 and sum(epoch1.values()) == 4 * 4 * per_step
    state = json.loads(
        (resumed / "checkpoints" / f"step{last:08d}" / "trainer_state.json").read_text()
    )
    assert state["world"] == after and state["step"] == last
    assert not (resumed / "plots").exists()  # train.plots=false (tiny_overrides)


@pytest.mark.slow
def test_two_ranks_resume_on_one_zero1(shards, tmp_path):
    """ZeRO 1, 2 ranks x grad_accum 1 -> 1 rank x grad_accum 2, stopped mid-epoch 1."""
    _elastic(shards, tmp_path, before=2, after=1, zero=1, stop=3)


@pytest.mark.slow
def test_one_rank_resumes_on_three_zero2(shards, tmp_path):
    """ZeRO 2, 1 rank x grad_accum 3 -> 3 ranks x grad_accum 1, stopped mid-epoch 1: the
    optimizer state is resharded through DeepSpeed's universal checkpoint."""
    _elastic(shards, tmp_path, before=1, after=3, zero=2, stop=2)


# ----------------------------------------------------------------------------- refusals


def _checkpoint(tmp_path: Path, identity: dict, world: int | None) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "step00000004"
    ckpt.mkdir(parents=True)
    state = {"step": 4, "identity": identity, **({"world": world} if world else {})}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_a_resume_that_changes_the_optimizer_step_says_which_settings_fit(tmp_path):
    from multieye_dist.train.resume import PER_STEP, check_resume

    ckpt = _checkpoint(tmp_path, {"data.batch_size": 4, PER_STEP: 4}, world=2)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    check_resume(ckpt, {"data.batch_size": 4, PER_STEP: 4}, state, world=4)  # 4 x 1: fine
    with pytest.raises(ConfigError, match=r"with 2 rank\(s\) set optim.grad_accum=2"):
        check_resume(ckpt, {"data.batch_size": 4, PER_STEP: 2}, state, world=2)
    with pytest.raises(ConfigError, match=r"3 rank\(s\) cannot.*divides 4 \(\[1, 2, 4\]\)"):
        check_resume(ckpt, {"data.batch_size": 4, PER_STEP: 3}, state, world=3)


def test_a_checkpoint_from_before_elastic_resume_needs_its_own_ranks(tmp_path):
    from multieye_dist.train.resume import PER_STEP, check_resume

    old = {"data.batch_size": 4, "optim.grad_accum": 1, "ranks (WORLD_SIZE)": 2}
    ckpt = _checkpoint(tmp_path, old, world=None)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    check_resume(ckpt, {"data.batch_size": 4, PER_STEP: 2}, state, world=2)
    with pytest.raises(ConfigError, match=r"saved by 2 rank\(s\) before .* resume it on 2"):
        check_resume(ckpt, {"data.batch_size": 4, PER_STEP: 2}, state, world=1)


def test_streams_are_kept_from_the_checkpoint_and_explicit_ones_checked(tmp_path):
    from multieye_dist.train.preflight import resolve_streams

    cfg = load_config(None, ["data.num_workers=3", f"data.shards={tmp_path}"])
    assert resolve_streams(cfg, 2, {}) == 6  # ranks x workers at the start
    assert resolve_streams(cfg, 2, {"identity": {"data.streams": 4}}) == 4  # kept on resume
    explicit = load_config(None, ["data.streams=8", f"data.shards={tmp_path}"])
    assert resolve_streams(explicit, 2, {"identity": {"data.streams": 4}}) == 8  # then refused
    with pytest.raises(ConfigError, match="data.streams"):
        load_config(None, ["data.streams=-1"])
