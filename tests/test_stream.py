"""Streaming pipeline with simulated ranks (explicit rank/world, as torch.distributed would give)
and real DataLoader worker processes."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_ranks

from multieye_dist.config import DataConfig
from multieye_dist.data.batch import DataError
from multieye_dist.data.layout import findings_file, label_file
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import (
    EvalStream,
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
)
from multieye_dist.data.synth import SynthOptions, generate
from multieye_dist.data.tario import iter_samples, write_samples

SIZE = 32
# augment_on=cpu: float batches from the workers, as released (tests/test_device_stream.py has
# the device path).
CFG = StreamConfig.from_data(
    DataConfig(),
    samples_per_epoch=256,
    batch_size=16,
    image_size=SIZE,
    pool_size=8,
    augment=False,
    augment_on="cpu",
)


def _convert(root: Path, out: Path, shard_samples: int = 10) -> Path:
    opts = ConvertOptions(
        shard_samples=shard_samples, workers=2, preprocess=Preprocess(image_size=SIZE)
    )
    convert(root, out, opts, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_root, tmp_path_factory) -> Path:
    return _convert(synth_root, tmp_path_factory.mktemp("stream") / "shards")


@pytest.fixture(scope="session")
def imbalanced_dir(tmp_path_factory) -> Path:
    """Class 8 is 100 times rarer than class 0 (200 vs 2 training images)."""
    base = tmp_path_factory.mktemp("imb")
    generate(base / "raw", SynthOptions(per_class=200, imbalance=100, image_size=32, workers=2))
    return _convert(base / "raw", base / "shards", shard_samples=100)


def _sets(d: Path, split: str = "train") -> tuple[ShardSet, ShardSet]:
    return ShardSet.from_manifest(d, "fundus", split), ShardSet.from_manifest(d, "oct", split)


def _train_batches(
    d: Path, cfg: StreamConfig, rank: int, world: int, workers: int, epoch: int = 0
) -> list[dict]:
    ds = PairedTrainStream(*_sets(d), cfg, rank=rank, world=world)
    ds.set_epoch(epoch)
    return list(make_loader(ds, workers))


def test_equal_batches_per_rank_and_label_matched_partners(shard_dir):
    counts = []
    for rank in (0, 1):
        batches = _train_batches(shard_dir, CFG, rank, world=2, workers=2)
        counts.append(len(batches))
        for b in batches:
            assert b.image.shape == (16, 3, SIZE, SIZE) and b.partner_image.shape == b.image.shape
            assert torch.equal(b.label, b.partner_label)  # 100% label match
            assert all(k.startswith("oct-train-") for k in b.partner_keys)
        assert sum(b.stats.unmatched_oct for b in batches) == 0
    assert counts == [256 // 2 // 16] * 2


def test_class_balance_with_a_rare_class(imbalanced_dir):
    """Over 2,700 draws each class is expected 300 times. A multinomial gives a standard
    deviation of ~16 per class; the per-worker class weights and finite pools add a little more.
    +-25% (75, over 4 sigma) fails for any real imbalance: without balancing the rare class
    would get ~6 draws and class 0 ~600."""
    cfg = replace(CFG, samples_per_epoch=2700, batch_size=30)
    labels = Counter()
    for b in _train_batches(imbalanced_dir, cfg, rank=0, world=1, workers=2):
        labels.update(b.label.tolist())
    assert sum(labels.values()) == 2700
    for c in range(9):
        assert 225 <= labels[c] <= 375, labels


def _all_keys(d: Path, modality: str, split: str) -> list[str]:
    m = json.loads((d / f"{modality}-{split}.manifest.json").read_text())
    return [s["__key__"] for e in m["shards"] for s in iter_samples(d / e["name"])]


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 4), (3, 1, 5), (1, 0, 7)])
def test_evaluation_scores_every_sample_exactly_once(shard_dir, world, workers, batch):
    for modality in ("fundus", "oct"):
        shards = ShardSet.from_manifest(shard_dir, modality, "dev")
        keys = []
        for rank in range(world):
            ds = EvalStream(shards, SIZE, batch, rank=rank, world=world)
            for b in make_loader(ds, workers):
                assert len(b.keys) <= batch and b.image.shape[0] == len(b.keys)
                keys += b.keys
        assert Counter(keys) == Counter(_all_keys(shard_dir, modality, "dev"))
        assert len(keys) == len(set(keys))


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b.keys + b.partner_keys]


def test_same_seed_rank_workers_epoch_give_the_same_order(shard_dir):
    a = _train_batches(shard_dir, CFG, 1, 2, 2, epoch=3)
    b = _train_batches(shard_dir, CFG, 1, 2, 2, epoch=3)
    assert _keys(a) == _keys(b)
    assert torch.equal(torch.cat([x.image for x in a]), torch.cat([x.image for x in b]))
    assert _keys(a) != _keys(_train_batches(shard_dir, CFG, 1, 2, 2, epoch=4))
    assert _keys(a) != _keys(_train_batches(shard_dir, CFG, 0, 2, 2, epoch=3))


def test_resume_at_epoch_boundary_reproduces_the_order(shard_dir):
    """An uninterrupted run iterates epochs 0 and 1 on one stream object; a resumed run builds a
    new object and starts at epoch 1."""
    cfg = replace(CFG, augment=True)  # augmentation randomness must follow the epoch too
    ds = PairedTrainStream(*_sets(shard_dir), cfg, rank=0, world=1)
    loader = make_loader(ds, 2)
    list(loader)
    ds.set_epoch(1)
    uninterrupted = list(loader)
    resumed = _train_batches(shard_dir, cfg, 0, 1, 2, epoch=1)
    assert _keys(uninterrupted) == _keys(resumed)
    for x, y in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(x.image, y.image) and torch.equal(x.partner_image, y.partner_image)


@pytest.mark.parametrize("workers,skip", [(0, 5), (2, 5), (3, 4)])
def test_resume_mid_epoch_yields_the_remaining_batches_in_order(shard_dir, workers, skip):
    """Skipping k batches (resume after step k) gives batches k, k+1, ... of the uninterrupted
    epoch, keys and augmented pixels, whatever k modulo the loader workers."""
    cfg = replace(CFG, augment=True)
    full = _train_batches(shard_dir, cfg, 1, 2, workers, epoch=2)
    ds = PairedTrainStream(*_sets(shard_dir), cfg, rank=1, world=2)
    ds.set_epoch(2, skip=skip)
    rest = list(make_loader(ds, workers))
    assert len(rest) == len(full) - skip
    assert _keys(rest) == _keys(full[skip:])
    for x, y in zip(full[skip:], rest, strict=True):
        assert torch.equal(x.image, y.image) and torch.equal(x.partner_image, y.partner_image)
    with pytest.raises(ValueError, match="skip=99"):
        ds.set_epoch(2, skip=99)


def test_unpaired_stream_for_the_teacher_stage(shard_dir):
    oct_set = ShardSet.from_manifest(shard_dir, "oct", "train")
    ds = PairedTrainStream(oct_set, None, CFG, rank=0, world=1)
    batches = list(make_loader(ds, 2))
    assert len(batches) == len(ds) == CFG.samples_per_epoch // CFG.batch_size
    b = batches[0]
    assert not b.paired and b.partner_label is None and b.partner_keys is None
    assert [m["modality"] for m in b.meta] == ["oct"] * CFG.batch_size  # the .json records
    assert [m["label"] for m in b.meta] == b.label.tolist()
    assert b.image.shape == (CFG.batch_size, 3, SIZE, SIZE)
    assert all(k.startswith("oct-train-") for bb in batches for k in bb.keys)
    assert b.stats.unmatched_oct == 0


def test_augmentation_is_the_release_recipe(shard_dir):
    cfg = replace(CFG, augment=True)
    ds = PairedTrainStream(*_sets(shard_dir), cfg, rank=0, world=1)
    transforms = ds.images.transform.transforms
    names = [type(t).__name__ for t in transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names
    assert names[-1] == "RandomErasing" and transforms[-1].probability == 0.25
    batch = next(iter(make_loader(ds, 0)))
    assert batch.image.dtype == torch.float32 and batch.image.min() < 0  # normalised


def _corrupt(shard_dir: Path, tmp_path: Path, n_bad: int) -> tuple[Path, list[str]]:
    d = tmp_path / "shards"
    shutil.copytree(shard_dir, d)
    shard = d / json.loads((d / "fundus-dev.manifest.json").read_text())["shards"][0]["name"]
    samples = list(iter_samples(shard))
    bad = [s["__key__"] for s in samples[:n_bad]]
    for s in samples[:n_bad]:
        s["png"] = b"\x89PNG\r\n\x1a\n broken"
    with open(shard, "wb") as fh:
        write_samples(fh, samples)
    return d, [f"{shard}:{k}" for k in bad]


def test_corrupt_sample_is_skipped_counted_and_named(shard_dir, tmp_path):
    d, bad = _corrupt(shard_dir, tmp_path, 1)
    shards = ShardSet.from_manifest(d, "fundus", "dev")
    ds = EvalStream(shards, SIZE, 4, rank=0, world=1, max_bad_fraction=0.1)
    batches = list(make_loader(ds, 0))
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(_all_keys(d, "fundus", "dev")) - 1
    assert batches[-1].stats.bad == 1 and batches[-1].stats.bad_examples == bad


def test_a_label_out_of_range_is_an_error_naming_shard_and_sample(shard_dir, tmp_path):
    """Labels are checked once, where a sample is read, not by the loss on every step."""
    d = tmp_path / "shards"
    shutil.copytree(shard_dir, d)
    shard = d / json.loads((d / "fundus-dev.manifest.json").read_text())["shards"][0]["name"]
    samples = list(iter_samples(shard))
    samples[2]["cls"] = b"9"
    with open(shard, "wb") as fh:
        write_samples(fh, samples)
    shards = ShardSet.from_manifest(d, "fundus", "dev")
    key = samples[2]["__key__"]
    with pytest.raises(DataError, match=rf"{shard.name}: sample {key}: label 9 outside 0..8"):
        list(EvalStream(shards, SIZE, 4, rank=0, world=1))


def test_too_many_corrupt_samples_stop_the_run(shard_dir, tmp_path):
    d, _ = _corrupt(shard_dir, tmp_path, 10)
    shards = ShardSet.from_manifest(d, "fundus", "dev")
    with pytest.raises(DataError, match=r"could not be decoded .*fundus-dev-000000.tar"):
        list(EvalStream(shards, SIZE, 4, rank=0, world=1, max_bad_fraction=0.01))


def test_missing_or_truncated_shard_is_named(shard_dir, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shard_dir, d)
    victim = d / "oct-dev-000001.tar"
    victim.write_bytes(victim.read_bytes()[:1500])
    with pytest.raises(DataError, match="oct-dev-000001.tar"):
        list(EvalStream(ShardSet.from_manifest(d, "oct", "dev"), SIZE, 4, rank=0, world=1))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="oct-dev-000001.tar"):
        ShardSet.from_manifest(d, "oct", "dev")


def test_class_without_oct_gets_a_random_partner_and_is_counted(synth_root, tmp_path, caplog):
    root = tmp_path / "raw"
    shutil.copytree(synth_root, root)
    lf = label_file(root, "oct", "train")
    kept = [ln for ln in lf.read_text().splitlines() if not ln.endswith(" 3")]
    lf.write_text("".join(ln + "\n" for ln in kept))
    # the findings sidecar lists exactly the label file's names
    names = {ln.split()[0] for ln in kept}
    ff = findings_file(root, "oct", "train")
    ff.write_text(
        "".join(ln + "\n" for ln in ff.read_text().splitlines() if ln.split()[0] in names)
    )
    d = _convert(root, tmp_path / "shards")
    batches = _train_batches(d, CFG, 0, 1, 0)
    f = torch.cat([b.label for b in batches])
    o = torch.cat([b.partner_label for b in batches])
    assert (f == 3).any() and not (o == 3).any()
    assert torch.equal(f[f != 3], o[f != 3])
    assert batches[-1].stats.unmatched_oct == int((f == 3).sum())
    assert "no OCT sample of class(es) [3]" in caplog.text


def test_resampled_mode_draws_from_all_shards(shard_dir):
    cfg = replace(CFG, resampled=True)
    batches = _train_batches(shard_dir, cfg, 0, 2, 1)
    assert len(batches) == 256 // 2 // 16
    assert len({k for b in batches for k in b.keys}) > 9
    assert np.all([torch.equal(b.label, b.partner_label) for b in batches])


def _gather_worker(rank: int, world: int, shard_dir: str, out: str) -> None:
    from multieye_dist.data.stream import gather_records

    shards = ShardSet.from_manifest(Path(shard_dir), "fundus", "dev")
    records = []
    for b in make_loader(EvalStream(shards, SIZE, 3), 2):  # rank/world from the group
        records += [
            {"key": k, "label": int(y), "rank": rank} for k, y in zip(b.keys, b.label, strict=True)
        ]
    gathered = gather_records(records)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    else:
        assert gathered is None


@pytest.mark.slow
def test_predictions_gathered_on_rank0_in_stable_order(shard_dir, tmp_path):
    out = tmp_path / "gathered.json"
    run_ranks(_gather_worker, 2, str(shard_dir), str(out))
    records = json.loads(out.read_text())
    keys = [r["key"] for r in records]
    assert keys == sorted(_all_keys(shard_dir, "fundus", "dev"))  # every sample once, sorted
    assert {r["rank"] for r in records} == {0, 1}  # both ranks scored a share


def test_rank_and_world_from_the_environment(shard_dir, monkeypatch):
    """As torchrun/DeepSpeed/Slurm set them: RANK and WORLD_SIZE, no explicit arguments."""
    shards = ShardSet.from_manifest(shard_dir, "oct", "dev")
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = EvalStream(shards, SIZE, 4)
        assert (ds.rank, ds.world) == (rank, 2)
        keys += [k for b in make_loader(ds, 2) for k in b.keys]
        train = PairedTrainStream(*_sets(shard_dir), CFG)
        assert len(train) == CFG.samples_per_epoch // 2 // CFG.batch_size
    assert sorted(keys) == sorted(_all_keys(shard_dir, "oct", "dev"))


def test_paired_arms_see_the_same_fundus_batches(shard_dir):
    """Partners have their own generator: with one seed, a run that draws OCT partners (the
    OCT-CoDA student) and one that does not (fundus-only) train on the same fundus samples with
    the same augmentation; a permuted partner map changes the partners only."""
    cfg = replace(CFG, augment=True)
    fundus, oct_set = _sets(shard_dir)
    runs = {
        "fundus-only": PairedTrainStream(fundus, None, cfg, rank=0, world=1),
        "paired": PairedTrainStream(fundus, oct_set, cfg, rank=0, world=1),
        "permuted": PairedTrainStream(
            fundus, oct_set, cfg, rank=0, world=1, partner_classes=(1, 2, 3, 4, 5, 6, 7, 8, 0)
        ),
    }
    batches = {name: list(make_loader(ds, 0)) for name, ds in runs.items()}
    base = batches["fundus-only"]

    def fundus_keys(bs):
        return [k for b in bs for k in b.keys]

    for name in ("paired", "permuted"):
        assert fundus_keys(batches[name]) == fundus_keys(base), name
        for x, y in zip(base, batches[name], strict=True):
            assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label)
    for b in batches["permuted"]:
        assert torch.equal(b.partner_label, (b.label + 1) % 9)  # every class has OCT here
    partners = [[k for b in batches[n] for k in b.partner_keys] for n in ("paired", "permuted")]
    assert partners[0] != partners[1]
    with pytest.raises(ValueError, match="permutation"):
        PairedTrainStream(fundus, oct_set, cfg, partner_classes=(0,) * 9)
