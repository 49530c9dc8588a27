"""data.augment_on=device: the workers send uint8 images at their stored size with each sample's
augmentation parameters, and BatchPreparer makes the model input where the model runs."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_ranks, tiny_overrides
from PIL import Image

from multieye_dist.config import DataConfig, load_config
from multieye_dist.data.decode import decode_pil, decode_uint8, stack_native
from multieye_dist.data.prepare import BatchPreparer
from multieye_dist.data.preprocess import BadImageError, Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import (
    EvalStream,
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
)

STORED = 40  # the shards' size; the tests train at other sizes
CFG = StreamConfig.from_data(
    DataConfig(),
    samples_per_epoch=96,
    batch_size=8,
    image_size=48,
    pool_size=8,
    augment=True,
    augment_on="device",
)


@pytest.fixture(scope="module")
def shard_dir(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device-stream") / "shards"
    opts = ConvertOptions(shard_samples=16, workers=2, preprocess=Preprocess(image_size=STORED))
    convert(synth_root, out, opts, progress=False)
    return out


def _sets(d: Path) -> tuple[ShardSet, ShardSet]:
    return ShardSet.from_manifest(d, "fundus", "train"), ShardSet.from_manifest(d, "oct", "train")


def _batches(d: Path, cfg: StreamConfig, paired: bool = True, skip: int = 0, workers: int = 0):
    f, o = _sets(d)
    ds = PairedTrainStream(f, o if paired else None, cfg, rank=0, world=1)
    ds.set_epoch(1, skip=skip)
    return list(make_loader(ds, workers))


def test_workers_send_uint8_at_the_stored_size_grey_oct_one_channel(shard_dir):
    b = _batches(shard_dir, CFG)[0]
    assert b.image.dtype == torch.uint8 and b.image.shape == (8, 3, STORED, STORED)
    assert b.partner_image.dtype == torch.uint8 and b.partner_image.shape == (8, 1, STORED, STORED)
    assert b.aug is not None and b.partner_aug is not None
    for size in (24, 48):  # smaller and larger than the stored images
        x = BatchPreparer(size)(b)
        assert x.aug is None and x.partner_aug is None
        for img in (x.image, x.partner_image):
            assert img.dtype == torch.float32 and img.shape == (8, 3, size, size)
            assert img.min() < 0 < img.max()  # normalised


def test_same_seed_same_batches_and_paired_arms_share_the_fundus(shard_dir):
    prep = BatchPreparer(CFG.image_size)
    a, b = _batches(shard_dir, CFG, workers=2), _batches(shard_dir, CFG, workers=2)
    solo = _batches(shard_dir, CFG, paired=False, workers=2)
    other = _batches(shard_dir, replace(CFG, seed=1), workers=2)
    for x, y, z, w in zip(a, b, solo, other, strict=True):
        px, py, pz = prep(x), prep(y), prep(z)
        assert torch.equal(px.image, py.image) and torch.equal(px.partner_image, py.partner_image)
        # The fundus-only arm trains on the same fundus images with the same augmentation.
        assert x.keys == z.keys and torch.equal(px.image, pz.image)
        assert not torch.equal(px.image, prep(w).image)


def test_resume_mid_epoch_gives_the_same_augmented_batches(shard_dir):
    prep = BatchPreparer(CFG.image_size)
    full = _batches(shard_dir, CFG)
    resumed = _batches(shard_dir, CFG, skip=5)
    assert len(resumed) == len(full) - 5
    for x, y in zip(full[5:], resumed, strict=True):
        assert x.keys == y.keys and x.partner_keys == y.partner_keys
        px, py = prep(x), prep(y)
        assert torch.equal(px.image, py.image) and torch.equal(px.partner_image, py.partner_image)


def test_samples_in_a_batch_get_their_own_augmentation(shard_dir):
    b = _batches(shard_dir, CFG)[0]
    same = replace(b, image=b.image[:1].expand_as(b.image).contiguous())
    out = BatchPreparer(CFG.image_size)(same).image
    flat = out.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i))


def test_device_evaluation_matches_the_cpu_transform(shard_dir):
    shards = ShardSet.from_manifest(shard_dir, "fundus", "dev")
    for size in (32, 56):
        cpu = list(EvalStream(shards, size, 4, rank=0, world=1, augment_on="cpu"))
        dev = list(EvalStream(shards, size, 4, rank=0, world=1, augment_on="device"))
        prep = BatchPreparer(size)
        for c, d in zip(cpu, dev, strict=True):
            assert c.keys == d.keys and d.image.dtype == torch.uint8
            diff = (prep(d).image - c.image).abs()
            # Normalised units: one grey level is about 1/58; bicubic kernels differ slightly.
            assert diff.mean() < 0.02 and diff.max() < 0.3


def test_decode_uint8_keeps_grey_and_matches_pil():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    for img, fmt, channels in [
        (rgb, "PNG", 3),
        (grey, "PNG", 1),
        (rgb, "JPEG", 3),
        (grey, "JPEG", 1),
        (rgba, "PNG", 3),  # alpha dropped through PIL, as the CPU path's RGB conversion does
        (rgb.convert("P"), "PNG", 3),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        x = decode_uint8(buf.getvalue())
        assert x.dtype == torch.uint8 and x.shape == (channels, 20, 30)
        ref = decode_pil(buf.getvalue())
        ref = ref.convert("L") if channels == 1 else ref
        want = torch.from_numpy(np.asarray(ref).copy())
        want = want[None] if want.ndim == 2 else want.permute(2, 0, 1)
        assert torch.equal(x, want), (img.mode, fmt)
    with pytest.raises(BadImageError, match="cannot decode image"):
        decode_uint8(b"\x89PNG\r\n\x1a\n broken")


def test_stack_native_brings_mixed_batches_to_one_size():
    a = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    b = torch.randint(0, 256, (1, 40, 40), dtype=torch.uint8)
    x = stack_native([a, b])
    assert x.shape == (2, 3, 40, 40) and x.dtype == torch.uint8
    assert torch.equal(x[1], b.expand(3, -1, -1))  # the largest is kept as it is
    assert torch.equal(stack_native([a, a]), torch.stack([a, a]))


def _train_two_steps(rank: int, world: int, overrides: list[str]) -> None:
    from multieye_dist.train.loop import run

    summary = run(load_config(None, overrides))
    assert summary["stopped"] and summary["step"] == 2, summary


@pytest.mark.slow
def test_training_with_the_device_augmentation(shard_dir, tmp_path):
    """Shards stored at 40 px train at 32 px with the release's augmentation on the device."""
    from multieye_dist.track.records import read_metrics

    out = tmp_path / "run"
    overrides = tiny_overrides(
        shard_dir,
        out,
        "loss.name=fundus-only",
        "data.num_workers=1",
        "data.augment=true",
        "data.augment_on=device",
        "train.stop_after_steps=2",
    )
    run_ranks(_train_two_steps, 1, overrides, timeout=240)
    steps = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in steps)
