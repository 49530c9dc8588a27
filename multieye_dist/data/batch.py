"""The records data moves in: :class:`Batch` (the one type that the loaders, the prefetcher, the
objectives and evaluation pass around), :class:`RawSample` (a sample as read from its shard),
:class:`StreamStats` (the counters that travel with every batch) and :class:`DataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from multieye_dist.data import schema

if TYPE_CHECKING:
    from multieye_dist.data.device_augment import AugmentParams

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Bad data beyond what the run tolerates, or a shard that cannot be read."""


@dataclass
class RawSample:
    key: str
    label: int
    data: bytes
    url: str
    meta: bytes | None = None  # the encoded .json record
    # Parsed once where the sample is read (its label is checked against .cls there).
    parsed: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict[str, Any]:
        if self.parsed is None:
            self.parsed = schema.parse_meta(self.meta, f"{self.url}:{self.key}")
        return dict(self.parsed)  # a copy: a sample drawn twice must not share one record


@dataclass
class StreamStats:
    """Counters travel with every batch, so the main process sees what its workers saw."""

    worker: int = 0  # the (logical) loader worker whose counts these are
    decoded: int = 0
    bad: int = 0  # undecodable, mislabelled or incomplete samples, and missing ones
    unmatched_oct: int = 0
    bad_examples: list[str] = field(default_factory=list)
    missing: int = 0  # of `bad`: listed in a manifest but not in the shard

    def record_bad(self, s: RawSample, consequence: str, max_bad_fraction: float) -> None:
        """Count and log an undecodable sample; stop the run past `max_bad_fraction`."""
        logger.warning("undecodable sample %s in shard %s: %s", s.key, s.url, consequence)
        self._count(f"{s.url}:{s.key}", 1, max_bad_fraction)

    def record_problem(self, url: str, key: str, problem: str, max_bad_fraction: float) -> None:
        """Count and log a sample of shard `url` that is bad as read (`problem`: "sample KEY
        ..."); it is skipped."""
        logger.warning("bad sample in shard %s, skipped: %s", url, problem)
        self._count(f"{url}:{key}", 1, max_bad_fraction)

    def record_missing(self, url: str, n: int, max_bad_fraction: float) -> None:
        """Count `n` samples that shard `url` lists but did not give (the caller warns)."""
        self.missing += n
        self._count(f"{url}: {n} missing", n, max_bad_fraction)

    def _count(self, example: str, n: int, max_bad_fraction: float) -> None:
        self.bad += n
        if len(self.bad_examples) < 10:  # the list travels with every batch: keep it short
            self.bad_examples.append(example)
        check_bad(self, max_bad_fraction)

    def snapshot(self) -> StreamStats:
        """A copy to send with a batch (the stream goes on counting into this one)."""
        return replace(self, bad_examples=list(self.bad_examples))


def check_bad(stats: StreamStats, max_bad_fraction: float, final: bool = False) -> None:
    # Mid-stream, judge the fraction only once there is something to judge it on; at the end
    # of a finite stream, always.
    seen = stats.decoded + stats.bad
    if stats.bad and (final or seen >= 50) and stats.bad / seen > max_bad_fraction:
        raise DataError(
            f"{stats.bad} of {seen} samples could not be decoded (or were mislabelled or "
            f"missing; > data.max_bad_fraction={max_bad_fraction:.1%}), e.g. "
            f"{'; '.join(stats.bad_examples[:3])}; check them with multieye-dist shards verify"
        )


@dataclass
class Batch:
    """One batch of a training or evaluation stream: the single record type that the loaders,
    the prefetcher, the objectives and evaluation pass around.

    ``image``/``label`` are the primary modality (fundus for the students, OCT for the teacher
    and for an OCT split's evaluation). A paired stream adds each sample's label-matched OCT
    partner in ``partner_*``; otherwise they are None. ``meta`` (``partner_meta``) is each primary
    sample's (partner's) ``.json`` record from its shard (:mod:`multieye_dist.data.schema`).
    ``stats`` are the cumulative counters of the worker that made the batch. An evaluation batch
    may be empty (it then only carries the stats of a worker whose last samples were
    undecodable).

    With ``data.augment_on=device`` the loader sends images as decoded, uint8 at their stored
    size (grey kept to one channel), and ``aug``/``partner_aug`` carry each sample's random
    augmentation parameters (None: evaluation transform); :mod:`multieye_dist.data.prepare`
    turns them into the normalised model input on the device.
    """

    image: torch.Tensor  # [B, 3, S, S] float32 normalised, or uint8 [B, C, H, W] (see aug)
    label: torch.Tensor  # [B] int64, in [0, num_classes): checked where the sample was read
    keys: list[str]
    meta: list[dict[str, Any]]
    stats: StreamStats
    partner_image: torch.Tensor | None = None
    partner_label: torch.Tensor | None = None
    partner_keys: list[str] | None = None
    partner_meta: list[dict[str, Any]] | None = None  # the partners' .json records
    aug: AugmentParams | None = None
    partner_aug: AugmentParams | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def paired(self) -> bool:
        return self.partner_image is not None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A copy with ``fn`` applied to every tensor (device copies, pinning)."""

        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        def a(p: AugmentParams | None) -> AugmentParams | None:
            return None if p is None else p.map_tensors(fn)

        return replace(
            self,
            image=fn(self.image),
            label=fn(self.label),
            partner_image=f(self.partner_image),
            partner_label=f(self.partner_label),
            aug=a(self.aug),
            partner_aug=a(self.partner_aug),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        # The DataLoader's pin-memory thread calls this on any batch object that has it.
        return self.map_tensors(lambda t: t.pin_memory())
