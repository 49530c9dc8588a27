#!/usr/bin/env python
"""Conversion throughput, shard reading against reading the same images as files, and shard
bytes at the release's resolution kept native against upscaled to 512 px.

    .venv/bin/python benchmarks/bench_convert.py [--per-class 300] [--image-size 224]
    .venv/bin/python benchmarks/bench_convert.py --only-bytes --per-class 60

Conversion is timed with 1 and with N workers (images/s and images/s per worker). Reading
decodes every image the same way (PIL -> RGB numpy array) from (a) the individual PNG files of
the released layout and (b) the WebDataset shards through webdataset's own reader; the ratio
shards/files is the figure that carries over to noisy machines. File-system caches are warm for
both (the same files were just written), which favours the small-files side.

The bytes table: synthetic data at the release's resolutions (fundus 224 px, OCT B-scans 448 px
wide), converted once with the default (each image keeps its size, padded to square) and once
with `--image-size 512` (the old default); MiB of shards (tar overhead included) per 1,000
images, per modality, the ratio, and how fast each decodes (tarfile reader, as above).
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


def read_group(out: Path, modality: str) -> int:
    from multieye_dist.data.tario import iter_samples

    n = 0
    for path in sorted(out.glob(f"{modality}-*.tar")):
        for sample in iter_samples(path):
            decode(sample["png"])
            n += 1
    return n


def release_bytes(work: Path, per_class: int, workers: int, repeats: int) -> None:
    """Shard bytes and decode rate at the release's resolutions, native against 512 px."""
    root = work / "raw-release"
    opts = SynthOptions(per_class=per_class, image_size=224, oct_image_size=448, workers=workers)
    generate(root, opts)
    cases = {"native": Preprocess(), "512": Preprocess(image_size=512)}
    stats: dict[tuple[str, str], tuple[float, float]] = {}  # -> (MiB per 1k images, images/s)
    for case, pp in cases.items():
        out = work / f"shards-release-{case}"
        convert_opts = ConvertOptions(shard_samples=500, workers=workers, preprocess=pp)
        summary = convert(root, out, convert_opts, progress=False)
        for modality in ("fundus", "oct"):
            groups = [m for m in summary.manifests if m["modality"] == modality]
            n = sum(m["num_samples"] for m in groups)
            size = sum(s["bytes"] for m in groups for s in m["shards"])
            secs = min(timed(read_group, out, modality)[0] for _ in range(repeats))
            stats[(modality, case)] = (size / n * 1000 / 2**20, n / secs)
    print(
        f"\nshard bytes per 1,000 images, release resolution (synth --image-size 224 "
        f"--oct-image-size 448, {per_class} train images per class), PNG; decode: "
        f"tarfile reader, best of {repeats}"
    )
    print(
        f"{'modality':<9}{'native px':>10}{'native MiB/1k':>15}{'512 px MiB/1k':>15}"
        f"{'512/native':>12}{'native img/s':>14}{'512 img/s':>11}"
    )
    for modality, px in (("fundus", 224), ("oct", 448)):
        (nat, nat_rate), (big, big_rate) = stats[(modality, "native")], stats[(modality, "512")]
        print(
            f"{modality:<9}{px:>10}{nat:>15.1f}{big:>15.1f}{big / nat:>11.2f}x"
            f"{nat_rate:>14.0f}{big_rate:>11.0f}"
        )


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def throughput(work: Path, args: argparse.Namespace) -> None:
    root = work / "raw"
    generate(
        root,
        SynthOptions(per_class=args.per_class, image_size=args.image_size, workers=args.workers),
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
        f"\n{n} images, {args.image_size} px PNG, {os.cpu_count()} CPU(s), best of {args.repeats}"
    )
    print(f"{'case':<30}{'images/s':>12}{'per worker':>12}")
    for name, rate, per in rows:
        print(f"{name:<30}{rate:>12.0f}{'' if per is None else f'{per:.0f}':>12}")
    print(
        f"conversion speed-up {rows[1][1] / rows[0][1]:.2f}x with {args.workers} workers; "
        f"shards/files read ratio {file_s / shard_s:.2f}x (wds), "
        f"{file_s / tar_s:.2f}x (tarfile)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only-bytes",
        action="store_true",
        help="only the bytes table (release resolution, native against 512 px)",
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        if not args.only_bytes:
            throughput(work, args)
        release_bytes(work, args.per_class, args.workers, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
