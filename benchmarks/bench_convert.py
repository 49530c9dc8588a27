#!/usr/bin/env python
"""Conversion throughput, and shard reading against reading the same images as files.

    .venv/bin/python benchmarks/bench_convert.py [--per-class 300] [--image-size 224]

Conversion is timed with 1 and with N workers (images/s and images/s per worker). Reading
decodes every image the same way (PIL -> RGB numpy array) from (a) the individual PNG files of
the released layout and (b) the WebDataset shards through webdataset's own reader; the ratio
shards/files is the figure that carries over to noisy machines. File-system caches are warm for
both (the same files were just written), which favours the small-files side.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from multieye_dist.data.layout import SPLITS, read_layout
from multieye_dist.data.preprocess import Preprocess
from multieye_dist.data.shards import ConvertOptions, convert
from multieye_dist.data.synth import SynthOptions, generate


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def read_files(root: Path) -> int:
    n = 0
    for samples, _ in read_layout(root, ("fundus", "oct"), SPLITS).values():
        for s in samples:
            decode(s.path.read_bytes())
            n += 1
    return n


def read_shards(out: Path) -> int:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("*.tar"))
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        decode(sample["png"])
        n += 1
    return n


def read_tar(out: Path) -> int:
    """The same shards through the standard-library reader: the format's cost without
    webdataset's pipeline."""
    from multieye_dist.data.tario import iter_samples

    n = 0
    for path in sorted(out.glob("*.tar")):
        for sample in iter_samples(path):
            decode(sample["png"])
            n += 1
    return n


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        root = work / "raw"
        generate(
            root,
            SynthOptions(
                per_class=args.per_class, image_size=args.image_size, workers=args.workers
            ),
        )
        pp = Preprocess(image_size=args.image_size)
        rows = []
        for workers in sorted({1, args.workers}):
            best = float("inf")
            for r in range(args.repeats):
                out = work / f"shards-{workers}-{r}"
                opts = ConvertOptions(shard_samples=500, workers=workers, preprocess=pp)
                t0 = time.perf_counter()
                summary = convert(root, out, opts, progress=False)
                best = min(best, time.perf_counter() - t0)
            n = sum(m["num_samples"] for m in summary.manifests)
            rows.append((f"convert, {workers} worker(s)", n / best, n / best / workers))
        out = work / "shards-1-0"
        file_s = min(timed(read_files, root)[0] for _ in range(args.repeats))
        shard_s, n = min(timed(read_shards, out) for _ in range(args.repeats))
        rows.append(("read+decode, image files", n / file_s, None))
        rows.append(("read+decode, shards (wds)", n / shard_s, None))
        tar_s = min(timed(read_tar, out)[0] for _ in range(args.repeats))
        rows.append(("read+decode, shards (tarfile)", n / tar_s, None))
        print(
            f"\n{n} images, {args.image_size} px PNG, {os.cpu_count()} CPU(s), best of "
            f"{args.repeats}"
        )
        print(f"{'case':<30}{'images/s':>12}{'per worker':>12}")
        for name, rate, per in rows:
            print(f"{name:<30}{rate:>12.0f}{'' if per is None else f'{per:.0f}':>12}")
        print(
            f"conversion speed-up {rows[1][1] / rows[0][1]:.2f}x with {args.workers} workers; "
            f"shards/files read ratio {file_s / shard_s:.2f}x (wds), "
            f"{file_s / tar_s:.2f}x (tarfile)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
