#!/usr/bin/env python
"""Training loader throughput in fundus-OCT pairs per second, against a release-style loader on
the same images, all measured in one run.

    .venv/bin/python benchmarks/bench_loader.py --image-size 512 --workers 0   # per core
    python3 benchmarks/bench_loader.py --image-size 512 --workers 16          # a GPU machine

The raw data is synthetic MultiEYE at the release's resolutions (fundus 224 px, OCT 448 px),
converted to shards at those sizes (``shards convert`` keeps them); the training input is
``--image-size``. Loaders compared:

- ``shards (ours), device``: PairedTrainStream with ``data.augment_on=device``: the workers read
  the shards, decode to uint8 at the stored size and draw each sample's augmentation parameters;
  the augmentation itself runs batched on the device (timed on its own below, and not part of
  the loader's CPU work).
- ``shards (ours), cpu``: the same stream with ``augment_on=cpu`` (timm per image in the worker).
- ``release-style``: a map-style dataset over the PNG files with a WeightedRandomSampler (weight
  1 / count of the class, with replacement) and a random OCT file of the same label per sample,
  PIL decode and timm's training augmentation at ``--image-size``, as MultiEYE's loader does.

With ``--workers 0`` everything runs in this process on one thread: pairs/s per core. The time
runs from the first batch to the last (worker start-up left out). Then: the device
augmentation's time per batch (on the GPU with its share of a ResNet-50 student step plus a
teacher forward; on the CPU for reference), the decoders side by side, and where one pair's CPU
time goes, before (release-style) and after (ours).
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from multieye_dist.config import DataConfig
from multieye_dist.data.decode import decode_pil, decode_torchvision, decode_uint8, stack_native
from multieye_dist.data.device_augment import TrainAugment
from multieye_dist.data.layout import read_layout
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import (
    PairedTrainStream,
    ShardSet,
    StreamConfig,
    make_loader,
    read_unit,
)
from multieye_dist.data.synth import SynthOptions, generate
from multieye_dist.data.transforms import train_transform


class ReleaseStyle(Dataset):
    """Map-style: fundus file i, plus a random OCT file with the same label."""

    def __init__(self, root: Path, transform):
        layout = read_layout(root, ("fundus", "oct"), ("train",))
        self.fundus = layout[("fundus", "train")][0]
        self.oct_by_label = defaultdict(list)
        for s in layout[("oct", "train")][0]:
            self.oct_by_label[s.label].append(s.path)
        self.transform = transform

    def weights(self) -> list[float]:
        counts = defaultdict(int)
        for s in self.fundus:
            counts[s.label] += 1
        return [1 / counts[s.label] for s in self.fundus]

    def __len__(self) -> int:
        return len(self.fundus)

    def __getitem__(self, i):
        s = self.fundus[i]
        o = random.choice(self.oct_by_label[s.label])
        f_img = self.transform(Image.open(s.path).convert("RGB"))
        o_img = self.transform(Image.open(o).convert("RGB"))
        return f_img, o_img, s.label


def rate(loader, batch: int) -> float:
    it = iter(loader)
    next(it)  # start-up excluded
    t0, n = time.perf_counter(), 0
    for _ in it:
        n += batch
    return n / (time.perf_counter() - t0)


def per_call_ms(fn, items: list, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        for x in items:
            fn(x)
    return 1e3 * (time.perf_counter() - t0) / (repeat * len(items))


def make_data(work: Path, args) -> tuple[Path, Path]:
    root, shards = work / "raw", work / "shards"
    generate(
        root,
        SynthOptions(
            per_class=args.per_class,
            image_size=args.fundus_size,
            oct_image_size=args.oct_size,
            workers=2,
        ),
    )
    convert(
        root,
        shards,
        ConvertOptions(shard_samples=64, splits=("train",), preprocess=Preprocess(fmt=args.format)),
        progress=False,
    )
    return root, shards


def loader_table(root: Path, shards: Path, args) -> list[tuple]:
    fs = ShardSet.from_manifest(shards, "fundus", "train")
    os_ = ShardSet.from_manifest(shards, "oct", "train")
    rel = ReleaseStyle(root, train_transform(args.image_size))
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        row = [w]
        for on in ("device", "cpu"):
            cfg = StreamConfig.from_data(
                DataConfig(),
                samples_per_epoch=args.samples,
                batch_size=args.batch,
                image_size=args.image_size,
                augment_on=on,
            )
            stream = PairedTrainStream(fs, os_, cfg, rank=0, world=1)
            row.append(rate(make_loader(stream, w), args.batch))
        sampler = WeightedRandomSampler(rel.weights(), args.samples, replacement=True)
        loader = DataLoader(
            rel, batch_size=args.batch, sampler=sampler, num_workers=w, drop_last=True
        )
        row.append(rate(loader, args.batch))
        rows.append(tuple(row))
    return rows


def sample_bytes(shards: Path, modality: str, n: int) -> list[bytes]:
    ss = ShardSet.from_manifest(shards, modality, "train")
    from multieye_dist.data.stream import make_units

    out = []
    for unit in make_units(ss, 1):
        for s in read_unit(unit, ss.image_ext):
            out.append(s.data)
            if len(out) == n:
                return out
    return out


def step_ms(batch: int, image_size: int, device: torch.device) -> float:
    """A ResNet-50 student forward and backward plus a ResNet-50 teacher forward, bf16 autocast,
    channels-last, at `image_size` (the shape of the OCT-CoDA step; GPU only)."""
    import timm

    student = timm.create_model("resnet50", num_classes=5).to(
        device, memory_format=torch.channels_last
    )
    teacher = timm.create_model("resnet50", num_classes=5).to(
        device, memory_format=torch.channels_last
    )
    teacher.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device).to(
        memory_format=torch.channels_last
    )

    def once() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                teacher(x)
            student(x).float().sum().backward()

    return cuda_ms(once)


def cuda_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / iters


def augment_table(shards: Path, args) -> list[str]:
    """The device augmentation of one fundus batch and its OCT partners' batch."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aug = TrainAugment(args.image_size)
    rng = np.random.default_rng(0)
    batches = []
    for m in ("fundus", "oct"):
        data = sample_bytes(shards, m, args.batch)
        data = (data * (args.batch // len(data) + 1))[: args.batch]
        x = stack_native([decode_uint8(d) for d in data]).to(dev)
        batches.append((m, x, aug.draw(rng, [tuple(x.shape[2:])] * len(data))))

    def run() -> None:
        for _, x, p in batches:
            aug(x, p.map_tensors(lambda t: t.to(dev)))

    if dev.type == "cuda":
        ms = cuda_ms(run)
        step = step_ms(args.batch, args.image_size, dev)
        share = f"{100 * ms / (ms + step):.1f}% of augmentation + step ({step:.1f} ms)"
    else:
        run()  # warm-up
        t0 = time.perf_counter()
        run()
        ms, share = 1e3 * (time.perf_counter() - t0), "n/a on the CPU (no GPU step to share)"
    shapes = ", ".join(f"{m} {tuple(x.shape)}" for m, x, _ in batches)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU, 1 thread"
    return [
        f"device augmentation on {dev} ({name}), batch {args.batch} pairs -> "
        f"{args.image_size} px, input {shapes}",
        f"  {ms:.1f} ms per batch, {ms / args.batch:.3f} ms per pair; share: {share}",
    ]


def decoder_rows(shards: Path) -> list[tuple]:
    """ms per image: the CPU path's PIL decode to an RGB image, the device path's PIL decode to
    a uint8 tensor (grey kept grey), torchvision.io's decoder (and simplejpeg's for JPEG, when
    installed), and whether their pixels are identical to PIL's."""
    import warnings

    warnings.filterwarnings("ignore", message=".*deprecated since torchvision")
    rows = []
    for m in ("fundus", "oct"):
        data = sample_bytes(shards, m, 32)
        exact = all(torch.equal(decode_torchvision(d), decode_uint8(d)) for d in data)
        size = Image.open(io.BytesIO(data[0])).size
        row = [f"{m} {size[0]}x{size[1]}", per_call_ms(decode_pil, data, 3)]
        row += [per_call_ms(decode_uint8, data, 3), per_call_ms(decode_torchvision, data, 3), exact]
        rows.append(tuple(row))
    return rows


def profile_rows(root: Path, shards: Path, args, ours_rate: float, rel_rate: float) -> list:
    """Where one pair's CPU time goes (ms), each component timed on its own over 32 images."""
    tf = train_transform(args.image_size)
    layout = read_layout(root, ("fundus", "oct"), ("train",))
    f_paths = [s.path for s in layout[("fundus", "train")][0][:32]]
    o_paths = [s.path for s in layout[("oct", "train")][0][:32]]
    f_pil = [Image.open(p).convert("RGB") for p in f_paths]
    o_pil = [Image.open(p).convert("RGB") for p in o_paths]
    f_data, o_data = sample_bytes(shards, "fundus", 32), sample_bytes(shards, "oct", 32)
    f_u8 = [decode_uint8(d) for d in f_data]
    o_u8 = [decode_uint8(d) for d in o_data]
    aug, rng = TrainAugment(args.image_size), np.random.default_rng(0)
    before = [
        ("decode fundus (PIL, file)", per_call_ms(lambda p: Image.open(p).convert("RGB"), f_paths)),
        (
            "decode OCT (PIL, file, to RGB)",
            per_call_ms(lambda p: Image.open(p).convert("RGB"), o_paths),
        ),
        ("timm augmentation, fundus", per_call_ms(tf, f_pil)),
        ("timm augmentation, OCT", per_call_ms(tf, o_pil)),
    ]
    after = [
        ("decode fundus (PIL -> uint8)", per_call_ms(decode_uint8, f_data, 3)),
        ("decode OCT (PIL -> uint8, grey)", per_call_ms(decode_uint8, o_data, 3)),
        (
            "stack uint8 (per pair)",
            per_call_ms(lambda _: (stack_native(f_u8), stack_native(o_u8)), [0]) / 32,
        ),
        (
            "draw parameters (per pair)",
            per_call_ms(lambda _: aug.draw(rng, [(224, 224)] * 64), [0]) / 32,
        ),
    ]
    for rows, total in ((before, 1e3 / rel_rate), (after, 1e3 / ours_rate)):
        rows.append(
            ("the rest (reading, sampling, collate, loader)", total - sum(t for _, t in rows))
        )
        rows.append(("total per pair (from the measured rate)", total))
    return [("release-style", before), ("shards (ours), device", after)]


def print_tables(args, rows, decoders, augment, profile) -> None:
    print(
        f"\npairs/s, training input {args.image_size} px, stored fundus {args.fundus_size} / OCT "
        f"{args.oct_size} px ({args.format}), batch {args.batch}, {args.samples} pairs"
    )
    head = f"{'workers':>8}{'shards (ours), device':>23}{'ours, cpu':>11}{'release-style':>15}"
    print(head + f"{'device / release':>18}")
    for w, dev, cpu, base in rows:
        print(f"{w:>8}{dev:>23.1f}{cpu:>11.1f}{base:>15.1f}{dev / base:>17.2f}x")
    print("\ndecoders, ms per image (identical: torchvision.io's pixels == PIL's)")
    print(f"{'image':>18}{'PIL -> RGB (cpu)':>18}{'PIL -> uint8 (device)':>23}", end="")
    print(f"{'torchvision.io':>16}{'identical':>11}")
    for name, pil, ours, tv, exact in decoders:
        print(f"{name:>18}{pil:>18.3f}{ours:>23.3f}{tv:>16.3f}{str(exact):>11}")
    print()
    print("\n".join(augment))
    if profile:
        print("\none pair's CPU time, ms (one thread)")
        for name, parts in profile:
            print(f"  {name}")
            for part, ms in parts:
                print(f"    {part:<48}{ms:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--image-size", type=int, default=512, help="training input (px)")
    p.add_argument("--fundus-size", type=int, default=224, help="stored fundus size (px)")
    p.add_argument("--oct-size", type=int, default=448, help="stored OCT size (px)")
    p.add_argument("--format", default="png", choices=("png", "jpg"))
    p.add_argument("--samples", type=int, default=1536, help="pairs per measurement")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0", help="comma list of loader worker counts")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        root, shards = make_data(work, args)
        rows = loader_table(root, shards, args)
        decoders = decoder_rows(shards)
        augment = augment_table(shards, args)
        single = [r for r in rows if r[0] == 0]
        profile = profile_rows(root, shards, args, single[0][1], single[0][3]) if single else []
        print_tables(args, rows, decoders, augment, profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
