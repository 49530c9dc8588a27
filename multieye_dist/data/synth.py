"""Synthetic MultiEYE: fundus-like and OCT-like pictures in the released layout.

Each class leaves a mark that a small CNN can learn from the pixels: on fundus, faint lesion
spots in a class-specific sector of the disc (low contrast, heavy noise); on OCT, a clear bump of
the retinal band at a class-specific position. The OCT signal is the stronger one on purpose, so
that an OCT teacher has something to teach a fundus student. Every image is drawn from its own
generator seeded by (seed, modality, split, index): the output does not depend on worker count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from multieye_dist.atomic import open_atomic, write_text
from multieye_dist.data.classes import NUM_CLASSES
from multieye_dist.data.layout import LABEL_FILE, LAYOUT, MODALITIES, SPLITS, image_dir
from multieye_dist.data.workers import process_pool

logger = logging.getLogger(__name__)

# Lesion colours per class on fundus (normal has none).
_PALETTE = [
    (0, 0, 0), (235, 225, 120), (250, 200, 160), (150, 20, 20), (240, 240, 210),
    (200, 210, 230), (110, 60, 30), (120, 0, 40), (90, 140, 60),
]  # fmt: skip


@dataclass(frozen=True)
class SynthOptions:
    per_class: int = 40  # train images per class and modality; dev and test get a quarter
    seed: int = 0
    image_size: int = 128
    imbalance: float = 1.0  # ratio of the most to the least frequent class (geometric in between)
    workers: int = 1

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise ValueError(f"--per-class {self.per_class}: must be >= 1")
        if self.image_size < 32:
            raise ValueError(f"--image-size {self.image_size}: must be >= 32")
        if self.imbalance < 1:
            raise ValueError(f"--imbalance {self.imbalance}: must be >= 1")


def class_counts(options: SynthOptions, split: str) -> list[int]:
    n = options.per_class if split == "train" else max(2, options.per_class // 4)
    decay = options.imbalance ** (1 / (NUM_CLASSES - 1))
    return [max(1, round(n / decay**c)) for c in range(NUM_CLASSES)]


def fundus_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    c = size / 2 + rng.normal(0, size * 0.01, 2)
    r = size * 0.46
    tint = rng.integers(-20, 20, 3)
    base = tuple(int(v) for v in np.clip(np.array([190, 80, 35]) + tint, 0, 255))
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=base)
    side = 1 if rng.random() < 0.5 else -1  # left or right eye
    od = (c[0] + side * r * 0.45, c[1] + rng.normal(0, size * 0.02))
    for _ in range(6):  # vessels fanning out of the optic disc
        ang = rng.uniform(0, 2 * math.pi)
        pts = [od]
        for step in range(1, 5):
            ang += rng.normal(0, 0.3)
            reach = r * 0.22 * step
            pts.append((od[0] + math.cos(ang) * reach, od[1] + math.sin(ang) * reach))
        draw.line(pts, fill=(120, 30, 20), width=max(1, size // 80))
    odr = r * 0.13
    draw.ellipse([od[0] - odr, od[1] - odr, od[0] + odr, od[1] + odr], fill=(245, 215, 150))
    if label:
        sector = 2 * math.pi * label / NUM_CLASSES
        for _ in range(int(rng.integers(2, 6))):
            a = sector + rng.normal(0, 0.25)
            d = r * rng.uniform(0.2, 0.75)
            x, y = c[0] + math.cos(a) * d, c[1] + math.sin(a) * d
            s = size * rng.uniform(0.015, 0.035)
            draw.ellipse([x - s, y - s, x + s, y + s], fill=_PALETTE[label])
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(size / 160)), dtype=np.float32)
    # Faint lesions: blend the picture towards the lesion-free base, then heavy noise.
    arr = 0.4 * arr + 0.6 * np.asarray(img.filter(ImageFilter.GaussianBlur(size / 25)), np.float32)
    arr += rng.normal(0, 18, arr.shape)
    mask = np.hypot(*(np.mgrid[0:size, 0:size] - c[::-1, None, None])) <= r
    arr *= mask[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def oct_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A B-scan, wider than tall (zero-padded to square at conversion, as the release did)."""
    w, h = size, size * 3 // 4
    x = np.arange(w) / w
    top = h * 0.4 + h * 0.03 * np.sin(2 * math.pi * (x * rng.uniform(0.5, 1.5) + rng.random()))
    if label:
        centre = (label - 0.5) / (NUM_CLASSES - 1)
        top -= h * 0.16 * np.exp(-((x - centre) ** 2) / (2 * 0.035**2))  # the class's bump
    thick = h * 0.2
    yy = np.arange(h)[:, None]
    depth = (yy - top[None, :]) / thick
    band = np.where((depth >= 0) & (depth <= 1), 0.55 + 0.35 * np.cos(depth * 5 * math.pi), 0.0)
    band = np.where((depth > 1) & (depth < 1.25), 0.95, band)  # bright RPE line
    arr = band * 200 * rng.uniform(0.85, 1.1)
    arr *= rng.gamma(4.0, 0.25, arr.shape)  # speckle
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _draw(job: tuple[str, str, int, int, int, int, str]) -> None:
    modality, split, index, label, seed, size, path = job
    rng = np.random.default_rng([seed, MODALITIES.index(modality), SPLITS.index(split), index])
    img = fundus_image(rng, label, size) if modality == "fundus" else oct_image(rng, label, size)
    # Whole or absent even if the user interrupts the run (the rename does that). No fsync: only a
    # power loss needs it, the set is regenerable, and one per image adds ~15% to drawing it on a
    # local disk (more on network file systems).
    with open_atomic(path, "wb", fsync=False) as fh:
        img.save(fh, format="PNG", compress_level=6)


def generate(out: Path, options: SynthOptions) -> dict[str, dict[str, list[int]]]:
    """Write the dataset; returns {modality: {split: per-class counts}}."""
    out = Path(out)
    jobs, summary = [], {}
    for modality in MODALITIES:
        image_dir(out, modality).mkdir(parents=True, exist_ok=True)
        summary[modality] = {}
        for split in SPLITS:
            counts = class_counts(options, split)
            summary[modality][split] = counts
            lines, index = [], 0
            for label, n in enumerate(counts):
                for _ in range(n):
                    name = f"{modality}-{split}-{label}-{index:06d}"
                    path = image_dir(out, modality) / f"{name}.png"
                    jobs.append(
                        (modality, split, index, label, options.seed, options.image_size, str(path))
                    )
                    lines.append(f"{name} {label}")
                    index += 1
            # Shuffle the listing (deterministically): real label files are not sorted by class.
            order = np.random.default_rng([options.seed, 99, SPLITS.index(split)]).permutation(
                len(lines)
            )
            split_dir = out / LAYOUT[modality][0] / split
            split_dir.mkdir(parents=True, exist_ok=True)
            write_text(split_dir / LABEL_FILE, "".join(lines[i] + "\n" for i in order))
    if options.workers > 1:
        with process_pool(options.workers) as pool:
            list(pool.map(_draw, jobs, chunksize=32))
    else:
        for job in jobs:
            _draw(job)
    logger.info("wrote %d synthetic images under %s", len(jobs), out)
    return summary
