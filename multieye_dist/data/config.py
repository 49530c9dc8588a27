"""The ``data`` section of the config: where the shards are and how the stream draws from them.

It lives with the data layer that reads it (the stream, the loader), so that the data modules
need nothing above them; :mod:`multieye_dist.config` assembles it with the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from multieye_dist.core.sections import Section
from multieye_dist.data.remote import location_problem


@dataclass(frozen=True)
class DataConfig(Section):
    _key: ClassVar[str] = "data"
    # Where the WebDataset shards and their manifests are: a directory, or a URL prefix
    # (http(s)://host/path, file:/abs/dir, pipe:CMD with {name}: multieye_dist/data/remote.py).
    # No default: a forgotten override must not train on some other data set (training refuses
    # an empty value; the demo sets its own).
    shards: str = ""
    image_size: int = 512  # training and evaluation input side, px (the release: 512)
    batch_size: int = 64  # per rank
    samples_per_epoch: int = 36000  # class-balanced draws per epoch (all ranks together)
    num_workers: int = 8  # loader worker processes per rank (0: load in the training process)
    pool_size: int = 32  # per-class pool for balanced sampling and OCT partners
    resampled: bool = False  # draw shards with replacement (endless) instead of splitting them
    seed: int = 0  # seed of the stream's draws and augmentation
    max_bad_fraction: float = 0.01  # corrupt samples tolerated before the run stops
    # The release's training augmentation (random resized crop, flip, RandAugment, erasing);
    # false = evaluation transform only (tiny CPU runs on position-coded synthetic data).
    augment: bool = True
    # Where the augmentation (or, without it, the resize and centre crop) runs. device: loader
    # workers only decode, to uint8 at the stored size, and draw each sample's parameters; the
    # ops run batched where the model runs (multieye_dist.data.device_augment). cpu: timm's
    # per-image transforms in the workers, as released. auto: device on a GPU, else cpu (on a
    # CPU the batched ops in the training process cost more than timm's in the workers).
    augment_on: Literal["auto", "device", "cpu"] = "auto"
    # Logical streams an epoch's class-balanced draws are split into (multieye_dist.data.stream):
    # 0 = ranks x max(num_workers, 1) at the run's start. A run keeps its value when resumed on
    # another number of ranks, so its epochs stay the same micro-batches; set it to a multiple
    # of every rank x worker count you may resume on (e.g. 512) to avoid a stream being read by
    # more than one worker after growing.
    streams: int = 0

    def _validate(self) -> None:
        for name in ("image_size", "batch_size", "samples_per_epoch", "pool_size"):
            self._check(getattr(self, name) >= 1, name, ">= 1")
        self._check(self.num_workers >= 0, "num_workers", ">= 0")
        self._check(self.streams >= 0, "streams", ">= 0 (0: ranks x loader workers)")
        self._check(self.seed >= 0, "seed", ">= 0")
        self._check(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "in [0, 1]")
        problem = location_problem(self.shards) if self.shards else None  # "": not set yet
        self._check(problem is None, "shards", problem or "")
