#!/usr/bin/env python
"""Training loader throughput in fundus-OCT pairs per second, against the number of workers,
next to a release-style loader on the same images and the same transforms.

    .venv/bin/python benchmarks/bench_loader.py [--per-class 60] [--image-size 224]

Ours: PairedTrainStream over WebDataset shards (class-balanced pools, label-matched OCT
partners). Release-style: a map-style dataset over the PNG files with a WeightedRandomSampler
(weight 1 / count of the class, with replacement) and a random OCT file of the same label per
sample, as MultiEYE's released loader does. Both decode with PIL and run the release's training
augmentation (timm RandAugment etc.). The time runs from the first batch to the last, so
worker start-up is left out of both.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from multieye_dist.config import DataConfig
from multieye_dist.data.layout import read_layout
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.stream import PairedTrainStream, ShardSet, StreamConfig, make_loader
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--samples", type=int, default=1536, help="pairs per measurement")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        root = work / "raw"
        generate(
            root, SynthOptions(per_class=args.per_class, image_size=args.image_size, workers=2)
        )
        convert(
            root,
            work / "shards",
            ConvertOptions(
                shard_samples=64, splits=("train",), preprocess=Preprocess(args.image_size)
            ),
            progress=False,
        )
        fs = ShardSet.from_manifest(work / "shards", "fundus", "train")
        os_ = ShardSet.from_manifest(work / "shards", "oct", "train")
        cfg = StreamConfig.from_data(
            DataConfig(),
            samples_per_epoch=args.samples,
            batch_size=args.batch,
            image_size=args.image_size,
        )
        tf = train_transform(args.image_size)
        rel = ReleaseStyle(root, tf)
        rows = []
        for w in (int(x) for x in args.workers.split(",")):
            ours = rate(
                make_loader(PairedTrainStream(fs, os_, cfg, rank=0, world=1), w), args.batch
            )
            sampler = WeightedRandomSampler(rel.weights(), args.samples, replacement=True)
            base = rate(
                DataLoader(
                    rel, batch_size=args.batch, sampler=sampler, num_workers=w, drop_last=True
                ),
                args.batch,
            )
            rows.append((w, ours, base))
        print(
            f"\npairs/s, {args.image_size} px, batch {args.batch}, {args.samples} pairs, "
            f"{len(rel)} fundus train images"
        )
        print(f"{'workers':>8}{'shards (ours)':>16}{'release-style':>16}{'ratio':>8}")
        for w, ours, base in rows:
            print(f"{w:>8}{ours:>16.1f}{base:>16.1f}{ours / base:>8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
