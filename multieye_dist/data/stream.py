"""Streaming shards to every rank and loader worker.

Work units. A split's shards are cut into *units* so that there are at least as many as the
training epoch's logical streams (S, below; for evaluation: ranks x loader workers): with n
shards and G streams each shard gives m = ceil(G / n) units, unit j of a shard keeping the
samples at positions j, j + m, j + 2m, ... (m = 1, the usual case, is the whole shard). Units are
dealt round-robin to the streams, so within an epoch every sample belongs to exactly one stream;
a shard is read more than once only when there are fewer shards than streams.

Training (class-balanced, paired). An epoch is S logical streams (``StreamConfig.streams``,
``data.streams``; 0: ranks x loader workers). Each keeps per-class pools of at most `pool_size`
encoded samples, fed by its fundus units. To emit a sample it draws a class c with probability
proportional to local_c / global_c (local_c: fundus samples of class c in the stream's units,
global_c: in the whole split, from the manifest), then a sample of class c uniformly from its pool,
and reads one new sample into the pools. Summed over streams this gives each class the same
expected frequency, as the release's WeightedRandomSampler (weight 1 / count of the class, with
replacement) does. The OCT partner comes the same way from per-class pools fed by an independent,
resampled OCT stream: same label when the OCT split has that class, else a random OCT sample
with its own label (as released), counted. Every epoch restarts a stream from a seed derived
from (seed, epoch, stream) alone.

Global position (elastic resume). The epoch's global micro-batch j is batch j // S of stream
j % S; with W ranks, rank r trains on j = r, r + W, r + 2W, ... (its batch p is j = p W + r), and
its loader worker w on its batches p = skip + w, skip + w + workers, ... (the DataLoader takes
them in turn). An optimizer step of W x grad_accum micro-batches is therefore the same
micro-batches on any number of ranks, and a resume skips the epoch's consumed micro-batches
(their draws are made, without decoding) on whatever ranks it runs. A worker that yields batches
of several streams keeps each open; one that yields only some batches of a stream makes the
others' draws without decoding them (more ranks x workers than S: that stream's shards are read
by each of those workers).

Paired arms. The partners have a generator of their own (draws and augmentation), derived from
the same seed: the fundus batches of a run depend on the seed alone, not on whether partners are
drawn, so a fundus-only and an OCT-CoDA run with one seed train on the same fundus samples, in
the same order, with the same augmentation (tests/test_stream.py compares their keys).

Evaluation. Units in a fixed order, each sample exactly once across ranks and workers, nothing
padded; ranks may get different numbers of batches (evaluation has no per-batch collective) and
`gather_records` brings everything to rank 0 sorted by sample key.

Integrity. Every read of a shard is held to its manifest (:func:`read_unit`): as many samples
as listed, with the positional keys ``shards convert`` gives them, in order. A shard that ends
early (an interrupted copy ends at a member boundary, which the tar reader takes for a clean
end) or holds other samples (another shard copied over it) never passes as a smaller split: it
is a DataError naming the shard and the counts, or, where the run tolerates bad samples
(``data.max_bad_fraction``), its missing samples count as bad ones, up to that limit. So does a
sample whose ``.cls`` and ``.json`` labels differ. Evaluation checks that every listed sample
was scored or counted bad (:func:`multieye_dist.train.evaluation.evaluate_split`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from multieye_dist.data import remote, schema
from multieye_dist.data.batch import Batch, DataError, RawSample, StreamStats, check_bad
from multieye_dist.data.classes import (
    DEFAULT_CLASS_NAMES,
    NUM_CLASSES,
    check_same_classes,
    manifest_class_names,
)
from multieye_dist.data.decode import decode_pil, decode_uint8, stack_native

if TYPE_CHECKING:
    from multieye_dist.data.config import DataConfig
    from multieye_dist.data.device_augment import AugmentParams, TrainAugment

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- shard sets and units


@dataclass(frozen=True)
class ShardSet:
    """The shards of one modality and split, as listed by their manifest."""

    modality: str
    split: str
    urls: tuple[str, ...]
    samples: tuple[int, ...]
    class_counts: tuple[tuple[int, ...], ...]  # per shard
    image_ext: str
    # The manifest's total (None: the shards' sum) and its count of skipped samples: keys are
    # positional (`shards convert`), so with none skipped a shard's keys are known exactly, and
    # each skip widens the window a shard's keys may fall in by one (None: keys not checked).
    num_samples: int | None = None
    key_slack: int | None = None
    # The manifest's classes, in label order (a manifest without them: MultiEYE's 9).
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    manifest: str = field(default="", compare=False)  # where it was read, for messages
    # The manifest's finding names (synthetic data: ROOT/findings.json), None without them.
    finding_names: tuple[str, ...] | None = None

    @classmethod
    def from_manifest(cls, location: str | Path, modality: str, split: str) -> ShardSet:
        """The shards that ``<modality>-<split>.manifest.json`` at `location` lists. `location`
        is a directory (or ``file:`` URL): every shard must exist; or a remote prefix
        (``http(s)://``, ``pipe:...{name}...``, :mod:`multieye_dist.data.remote`): the manifest
        is read from it and a shard is only checked when a worker reads it."""
        where = remote.parse(location)
        name = f"{modality}-{split}.manifest.json"
        if where.is_local:
            shard_dir = where.path
            path = Path(shard_dir) / name
            if not path.is_file():
                raise FileNotFoundError(f"no manifest {path}: convert the {modality} {split} split")
            m = schema.load_manifest(path, modality, split)  # an error names file and field
            urls = tuple(str(Path(shard_dir) / s["name"]) for s in m["shards"])
            for url in urls:
                if not Path(url).is_file():
                    raise FileNotFoundError(f"shard {url} listed in {path} is missing")
        else:
            text = remote.read_text(where, name)
            try:
                m = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {where.member(name)} is not JSON: {exc}") from None
            urls = tuple(where.member(s["name"]) for s in m["shards"])
        return cls(
            modality,
            split,
            urls,
            tuple(s["samples"] for s in m["shards"]),
            tuple(tuple(s["class_counts"]) for s in m["shards"]),
            m["image_ext"],
            _int_or_none(m.get("num_samples")),
            _int_or_none(m.get("num_skipped")),
            manifest_class_names(m),
            str(path) if where.is_local else where.member(name),
            _finding_names(m),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def total_class_counts(self) -> np.ndarray:
        return np.asarray(self.class_counts, dtype=np.int64).reshape(-1, self.num_classes).sum(0)

    @property
    def listed(self) -> int:
        """Samples the manifest lists for the split."""
        return sum(self.samples) if self.num_samples is None else self.num_samples

    def expected(self) -> list[ShardExpect]:
        """What reading each shard must give: its sample count and the window of its keys."""
        prefix = f"{self.modality}-{self.split}-" if self.key_slack is not None else None
        out, lo = [], 0
        for n in self.samples:
            out.append(ShardExpect(n, prefix, lo, lo + n + (self.key_slack or 0)))
            lo += n
        return out


def _finding_names(manifest: dict[str, Any]) -> tuple[str, ...] | None:
    names = manifest.get("finding_names")
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return tuple(names) if ok else None


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


@dataclass(frozen=True)
class ShardExpect:
    """One shard as its manifest lists it: `samples` samples whose keys are ``prefix`` + nine
    digits, strictly increasing, in [lo, hi) (prefix None: keys not checked)."""

    samples: int
    prefix: str | None
    lo: int
    hi: int

    def key_number(self, key: str) -> int | None:
        """The key's position if it has the shard's prefix and nine ASCII digits, else None."""
        digits = key[len(self.prefix) :] if key.startswith(self.prefix) else ""
        if len(digits) != 9 or not (digits.isascii() and digits.isdigit()):
            return None
        return int(digits)

    def window(self) -> str:
        if self.prefix is None:
            return ""
        return f" (keys {self.prefix}{self.lo:09d} to {self.prefix}{self.hi - 1:09d})"


@dataclass(frozen=True)
class Unit:
    url: str
    offset: int
    stride: int
    class_counts: tuple[float, ...]  # expected, for strided units
    expect: ShardExpect | None = None  # the whole shard's, as its manifest lists it

    @property
    def share(self) -> int | None:
        """Samples of the shard this unit must yield (None: unknown)."""
        if self.expect is None:
            return None
        return len(range(self.offset, self.expect.samples, self.stride))


def make_units(shards: ShardSet, workers: int) -> list[Unit]:
    n = len(shards.urls)
    if n == 0:
        return []
    m = math.ceil(workers / n)
    return [
        Unit(url, j, m, tuple(c / m for c in counts), expect)
        for url, counts, expect in zip(
            shards.urls, shards.class_counts, shards.expected(), strict=True
        )
        for j in range(m)
    ]


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed, else the RANK / WORLD_SIZE environment (as
    torchrun, DeepSpeed and our Slurm launcher set them). Resolve it in the rank's own process:
    the process group does not exist inside DataLoader worker processes."""
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def identity(rank: int, world: int) -> tuple[int, int, int, int]:
    """(rank, world, worker, workers) inside a loader worker (or the main process)."""
    info = get_worker_info()
    return rank, world, (info.id if info else 0), (info.num_workers if info else 1)


_ADVICE = "truncated, or replaced by another shard? restore it or reconvert the split"
_warned_shards: set[str] = set()  # shards already named in a warning by this process


class _ShardRead:
    """One read of a shard against what its manifest lists (`unit.expect`): samples with an
    expected key are admitted in order and numbered; the rest are foreign (another shard's, a
    repeat, or more than listed) and never yielded. Bad samples of a strict read are kept here,
    to be reported with the counts when the shard ends."""

    def __init__(self, unit: Unit):
        self.unit, self.exp = unit, unit.expect
        self.admitted = 0
        self.last = -1  # number of the last admitted key
        self.foreign: list[str] = []
        self.problems: list[str] = []

    def admit(self, key: str) -> bool:
        exp = self.exp
        ok = exp is None or self.admitted < exp.samples
        if ok and exp is not None and exp.prefix is not None:
            num = exp.key_number(key)
            ok = num is not None and max(exp.lo, self.last + 1) <= num < exp.hi
            self.last = num if ok else self.last
        if ok:
            self.admitted += 1
        else:
            self.foreign.append(key)
        return ok

    def mine(self) -> bool:
        """Whether the sample just admitted belongs to this unit (position modulo stride)."""
        return (self.admitted - 1) % self.unit.stride == self.unit.offset

    def _counts(self) -> str:
        """What was read against what is listed, or "" when they agree."""
        exp = self.exp
        if exp is None or (self.admitted == exp.samples and not self.foreign):
            return ""
        what = f"{self.admitted} of the {exp.samples} samples its manifest lists{exp.window()}"
        what += " were read"
        if self.foreign:
            what += f", {len(self.foreign)} it does not list (e.g. {self.foreign[0]}) ignored"
        return what

    def finish(self, stats: StreamStats | None, max_bad_fraction: float) -> None:
        """At the end of the shard. Strict (no `stats`): a difference or a bad sample is a
        DataError. Tolerant: this unit's share of the missing samples is counted as bad and the
        shard is named in a warning (once per process)."""
        url, counts = self.unit.url, self._counts()
        if stats is None:
            if not (counts or self.problems):
                return
            bad = self.problems[0] if self.problems else ""
            if len(self.problems) > 1:
                bad += f" (and {len(self.problems) - 1} more bad sample(s))"
            if counts:
                detail = f"{counts}{'; ' + bad if bad else ''} ({_ADVICE})"
            else:
                detail = f"{bad}; fix the shard or tolerate bad samples (data.max_bad_fraction)"
            raise DataError(f"shard {url}: {detail}")
        if not counts:
            return
        if url not in _warned_shards:
            _warned_shards.add(url)
            missing = self.exp.samples - self.admitted
            logger.warning(
                "shard %s: %s; %d missing counted as bad (%s)", url, counts, missing, _ADVICE
            )
        mine = self.unit.share - len(range(self.unit.offset, self.admitted, self.unit.stride))
        if mine:
            stats.record_missing(url, mine, max_bad_fraction)


def _parse_sample(
    s: dict[str, Any], ext: str, url: str, num_classes: int = NUM_CLASSES
) -> tuple[RawSample | None, str]:
    """(sample, "") or (None, why it is bad: "sample KEY ..."). A label outside the manifest's
    classes is a DataError naming the shard: a broken writer, not a damaged sample."""
    key = s.get(schema.KEY)
    where = f"sample {key}"
    missing = [m for m in schema.missing_members(s, ext) if m != schema.META]
    if missing:
        return None, f"{where} lacks {', '.join('.' + m for m in missing)}"
    try:
        label = schema.parse_label(s[schema.LABEL], where, num_classes)
    except schema.SampleError as exc:
        raise DataError(f"{url}: {exc}") from None
    sample = RawSample(key, label, s[ext], url, s.get(schema.META))
    try:
        # Parsed once, here: the label check needs it and batches carry it. Other tools'
        # records may lack a label; ours always have one.
        sample.parsed = schema.parse_meta(sample.meta, where)
        schema.check_label(sample.parsed, label, where, required=False)
    except schema.SampleError as exc:
        return None, str(exc)
    return sample, ""


def read_unit(
    unit: Unit, ext: str, stats: StreamStats | None = None, max_bad_fraction: float = 0.0
) -> Iterator[RawSample]:
    """Samples of one unit, in shard order, through webdataset's tar reader (which also takes
    pipe: and remote URLs). The shard must give exactly the samples its manifest lists: their
    number, and for positional keys their window and order (``unit.expect``). Samples it does
    not list, and bad ones (without their image or label, or whose .cls and .json labels
    differ), are never yielded.

    Strict (no `stats`, or `max_bad_fraction` 0): a truncated or unreadable shard, samples
    missing or not listed, or a bad sample is a DataError naming the shard, the counts and the
    sample, when the shard ends. Tolerant: bad samples and this unit's share of the missing ones
    are counted in `stats` and named in warnings, up to `max_bad_fraction`. A label outside 0..8
    is an error at once."""
    import webdataset as wds

    tolerant = stats is not None and max_bad_fraction > 0
    check = _ShardRead(unit)
    try:
        # Splitting across nodes and workers is ours (units); webdataset's own splitters would
        # hand this single shard to worker 0 only.
        stream = wds.WebDataset(
            unit.url, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
        )
        for s in stream:
            if not check.admit(s.get(schema.KEY)) or not check.mine():
                continue  # foreign samples: reported by check.finish
            sample, problem = _parse_sample(s, ext, unit.url, len(unit.class_counts) or NUM_CLASSES)
            if sample is not None:
                yield sample
            elif tolerant:
                stats.record_problem(unit.url, s.get(schema.KEY), problem, max_bad_fraction)
            else:
                check.problems.append(problem)
    except DataError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, ...: name the shard
        raise DataError(f"cannot read shard {unit.url}: {type(exc).__name__}: {exc}") from exc
    check.finish(stats if tolerant else None, max_bad_fraction)


# ---------------------------------------------------------------- decoding, RNG, stats


AUG_SEED = 0xA06  # the device augmentation's draws: their own stream of the batch's seed


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@contextmanager
def rng_scope(state: dict):
    """Run transforms on the stream's own python/numpy/torch RNG state, leaving the caller's
    untouched (so num_workers=0 neither consumes nor reseeds the training process's RNG)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.setstate(state["py"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    try:
        yield
    finally:
        state.update(py=random.getstate(), np=np.random.get_state(), torch=torch.get_rng_state())
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def new_rng_state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "py": random.Random(seed).getstate(),
        "np": np.random.RandomState(seed % 2**32).get_state(),
        "torch": gen.get_state(),
    }


# ---------------------------------------------------------------- image pipelines

AUGMENT_ON = ("auto", "device", "cpu")


def resolve_augment_on(augment_on: str) -> str:
    """``auto``: ``device`` where a GPU will run the ops, else ``cpu``."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"data.augment_on={augment_on!r}: choose one of {', '.join(AUGMENT_ON)}")
    if augment_on == "auto":
        return "device" if torch.cuda.is_available() else "cpu"
    return augment_on


class HostImages:
    """``augment_on=cpu``: PIL decode and the per-image transform in the worker; float batches."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def decode(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_pil(data))

    def collate(self, images: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, None]:
        return (torch.stack(images) if images else torch.empty(0)), None


class DeviceImages:
    """``augment_on=device``: the worker decodes to uint8 at the stored size and draws each
    sample's augmentation parameters (from `seed`: a function of the batch, for resume); the
    device applies them (:class:`~multieye_dist.data.prepare.BatchPreparer`). Without an
    augmentation (evaluation, ``data.augment=false``) the device resizes and centre-crops."""

    def __init__(self, augment: TrainAugment | None):
        self.augment = augment

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_uint8(data)

    def collate(
        self, images: list[torch.Tensor], seed: int
    ) -> tuple[torch.Tensor, AugmentParams | None]:
        if not images:
            return torch.empty(0, dtype=torch.uint8), None
        x = stack_native(images)
        if self.augment is None:
            return x, None
        sizes = [(x.shape[2], x.shape[3])] * len(images)
        return x, self.augment.draw(np.random.default_rng(seed), sizes)


def image_pipeline(augment_on: str, image_size: int, augment: bool, transform=None):
    """The worker side of ``data.augment_on`` (`transform` replaces the CPU path's default)."""
    from multieye_dist.data.transforms import eval_transform, train_transform

    augment_on = resolve_augment_on(augment_on)
    if transform is not None:
        return HostImages(transform)
    if augment_on == "device":
        from multieye_dist.data.device_augment import TrainAugment

        return DeviceImages(TrainAugment(image_size) if augment else None)
    default = train_transform if augment else eval_transform
    return HostImages(transform or default(image_size))


# ---------------------------------------------------------------- per-class pools


class ClassPools:
    """At most `size` samples per class; a new sample past that replaces a random one, so the
    pool follows the stream with bounded memory."""

    def __init__(self, size: int, rng: np.random.Generator, num_classes: int = NUM_CLASSES):
        self.size, self.rng = size, rng
        self.pools: list[list[RawSample]] = [[] for _ in range(num_classes)]

    def add(self, s: RawSample) -> None:
        pool = self.pools[s.label]
        if len(pool) < self.size:
            pool.append(s)
        else:
            pool[int(self.rng.integers(len(pool)))] = s

    def present(self) -> np.ndarray:
        return np.array([len(p) > 0 for p in self.pools])

    def draw(self, c: int) -> RawSample:
        pool = self.pools[c]
        return pool[int(self.rng.integers(len(pool)))]

    def discard(self, s: RawSample) -> None:
        pool = self.pools[s.label]
        if s in pool:
            pool.remove(s)


def cycle_units(
    units: list[Unit],
    ext: str,
    rng: np.random.Generator,
    resampled: bool,
    stats: StreamStats | None = None,
    max_bad_fraction: float = 0.0,
):
    """Endless samples: `units` in a fresh random order each pass, or drawn with replacement.
    Bad and missing samples are counted in `stats` (:func:`read_unit`)."""
    if not units:
        raise DataError("no shard units to read")
    while True:
        order = (
            rng.integers(len(units), size=len(units)) if resampled else rng.permutation(len(units))
        )
        n = 0
        for i in order:
            for s in read_unit(units[int(i)], ext, stats, max_bad_fraction):
                n += 1
                yield s
        if n == 0:  # never spin on empty shards
            raise DataError(
                f"a pass over {len(units)} shard unit(s) gave no sample: {units[0].url}"
            )


def fill(pools: ClassPools, stream, wanted: np.ndarray, limit: int) -> None:
    """Read until every wanted class is in the pools and at least one pool is full, or `limit`
    samples were read (a class absent from every unit read cannot be waited for forever)."""
    for _ in range(max(limit, 1)):
        have = pools.present()
        if (have >= wanted).all() and max(len(p) for p in pools.pools) >= pools.size:
            return
        pools.add(next(stream))


# ---------------------------------------------------------------- training stream


@dataclass(frozen=True)
class StreamConfig:
    """What the training stream reads of the ``data`` config section; the defaults and their
    meaning live in :class:`multieye_dist.data.config.DataConfig` alone (:meth:`from_data`)."""

    samples_per_epoch: int  # over all ranks
    batch_size: int  # per rank
    image_size: int
    seed: int
    resampled: bool  # fundus shards drawn with replacement instead of split per epoch
    # Per class, for fundus and for OCT: a worker holds up to 2 x 9 x pool_size encoded images.
    pool_size: int
    max_bad_fraction: float
    augment: bool
    augment_on: str  # "device": uint8 batches + parameters; "cpu": augmented in the worker
    # The epoch's logical streams (0: ranks x loader workers). Fixed for a run, so that its
    # epochs are the same micro-batches whatever the number of ranks (elastic resume).
    streams: int = 0

    @classmethod
    def from_data(cls, data: DataConfig, **changes: Any) -> StreamConfig:
        """The stream's view of ``data`` (a :class:`~multieye_dist.data.config.DataConfig`), with
        ``changes`` applied on top (benchmarks and tests)."""
        return cls(**{f.name: changes.get(f.name, getattr(data, f.name)) for f in fields(cls)})


class PairedTrainStream(IterableDataset):
    """Class-balanced fundus batches, each sample with a label-matched OCT partner.

    Yields :class:`Batch` records: the fundus samples as ``image``/``label`` and their OCT
    partners as ``partner_*``. With ``oct=None`` (the teacher stage, where the primary stream is
    OCT itself, and the fundus-only student) no partner is drawn.
    `len()` is the number of batches every rank yields in an epoch.
    """

    def __init__(
        self,
        fundus: ShardSet,
        oct: ShardSet | None,
        cfg: StreamConfig,
        transform: Callable | None = None,
        oct_transform: Callable | None = None,
        rank: int | None = None,
        world: int | None = None,
        partner_classes: tuple[int, ...] | None = None,
    ):
        self.fundus, self.oct, self.cfg = fundus, oct, cfg
        # partner_classes[c]: the OCT class to pair a fundus sample of class c with (None: c
        # itself, as released). A permutation pairs every class with another one's OCT (the
        # permuted-teacher control of multieye_dist.train.objectives).
        n = fundus.num_classes
        if oct is not None:  # a label index must mean one class in both modalities
            check_same_classes(fundus.class_names, fundus.manifest, oct.class_names, oct.manifest)
        if partner_classes is not None and sorted(partner_classes) != list(range(n)):
            raise ValueError(
                f"partner_classes={partner_classes}: must be a permutation of 0..{n - 1}"
            )
        self.partner_classes = partner_classes
        # `transform`/`oct_transform` replace the per-image transforms of augment_on=cpu.
        self.images = image_pipeline(cfg.augment_on, cfg.image_size, cfg.augment, transform)
        self.oct_images = self.images
        if oct_transform is not None:
            self.oct_images = HostImages(oct_transform)
        self.rank, self.world = rank_world(rank, world)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration at `epoch`, past its first `skip` batches on this rank.

        Skipped batches make the same random draws without decoding or augmenting (each batch's
        augmentation is seeded by its own index), so resuming mid-epoch yields exactly the
        batches an uninterrupted run would have, unless a skipped batch hit an undecodable
        sample (then the draws after it differ; still a valid epoch). After an elastic resume
        (another number of ranks) `skip` is the epoch's global position divided among the new
        ranks: see the class docstring.
        """
        if not 0 <= skip <= len(self):
            raise ValueError(f"skip={skip}: must be in [0, {len(self)}] batches")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.cfg.samples_per_epoch // self.world // self.cfg.batch_size

    def __iter__(self) -> Iterator[Batch]:
        rank, world, loader_worker, workers = identity(self.rank, self.world)
        n_streams = self.cfg.streams or world * workers
        stats = StreamStats(worker=loader_worker)  # from the first read: missing samples count
        streams: dict[int, _LogicalStream] = {}
        # The DataLoader takes batches round-robin from its workers, starting at worker 0: this
        # rank's batch p (p >= skip) comes from loader worker (p - skip) % workers.
        for p in range(self.skip + loader_worker, len(self), workers):
            j = p * world + rank  # the epoch's global micro-batch index
            s, k = j % n_streams, j // n_streams
            if s not in streams:
                streams[s] = self._open_stream(s, n_streams, stats, announce=s == 0 and rank == 0)
            yield streams[s].batch(k)

    def _open_stream(
        self, s: int, n_streams: int, stats: StreamStats, announce: bool
    ) -> _LogicalStream:
        """Logical stream `s` of `n_streams` at the start of the epoch: its share of the shard
        units, its pools filled, its generators seeded by (seed, epoch, s) alone."""
        cfg = self.cfg
        seed = _seed(cfg.seed, self.epoch, s)
        rng = np.random.default_rng(seed)
        units = make_units(self.fundus, n_streams)
        if cfg.resampled:
            mine = units
        else:  # this epoch's deal of units to the logical streams
            perm = np.random.default_rng(_seed(cfg.seed, self.epoch, 7)).permutation(len(units))
            mine = [units[i] for i in perm[s::n_streams]]
        global_counts = self.fundus.total_class_counts
        local = np.sum([u.class_counts for u in mine], axis=0)
        # Release weights 1/count_c, applied to the samples this stream can see.
        weights = np.where(global_counts > 0, local / np.maximum(global_counts, 1), 0.0)
        f_stream = cycle_units(
            mine, self.fundus.image_ext, rng, cfg.resampled, stats, cfg.max_bad_fraction
        )
        f_pools = ClassPools(cfg.pool_size, rng, self.fundus.num_classes)
        fill(f_pools, f_stream, weights > 0, limit=int(local.sum()) + cfg.pool_size)
        weights = weights * f_pools.present()
        if weights.sum() == 0:
            raise DataError(f"logical stream {s}: no fundus sample in its shards")
        # The partners' own generator: drawing them leaves the fundus draws untouched.
        p_seed = _seed(seed, 0x0C7)
        partner = self._partner_pools(p_seed, global_counts, announce, stats)
        return _LogicalStream(
            self, seed, p_seed, rng, weights / weights.sum(), f_pools, f_stream, partner, stats
        )

    def _partner_pools(
        self, seed: int, fundus_counts: np.ndarray, announce: bool, stats: StreamStats
    ):
        """(generator, pools, stream) of OCT partners, or None without an OCT split."""
        if self.oct is None:
            return None
        rng = np.random.default_rng(seed)
        o_units = make_units(self.oct, 1)
        o_stream = cycle_units(
            o_units, self.oct.image_ext, rng, True, stats, self.cfg.max_bad_fraction
        )
        o_pools = ClassPools(self.cfg.pool_size, rng, self.oct.num_classes)
        o_global = self.oct.total_class_counts
        fill(o_pools, o_stream, o_global > 0, limit=int(o_global.sum()) + self.cfg.pool_size)
        unpaired = [
            c for c in range(len(fundus_counts)) if fundus_counts[c] and not o_pools.pools[c]
        ]
        if unpaired and announce:  # once per run, not once per worker
            logger.warning(
                "no OCT sample of class(es) %s: their fundus samples get a random OCT "
                "partner with its own label (counted as unmatched_oct)",
                unpaired,
            )
        return rng, o_pools, o_stream

    def _pick(
        self,
        rng,
        pools: ClassPools,
        stream,
        stats: StreamStats,
        images: HostImages | DeviceImages,
        weights: np.ndarray,
        cls: int | None = None,
        decode_it: bool = True,
    ) -> tuple[torch.Tensor | None, RawSample]:
        """One decoded, transformed sample: of class `cls` while its pool has one, else of a
        class drawn by `weights` among the non-empty pools. An undecodable sample is dropped from
        its pool, counted, reported, and another is drawn. With `decode_it=False` only the draws
        are made (skipping batches on resume)."""
        while True:
            if cls is not None and pools.pools[cls]:
                c = cls
            else:
                w = weights * pools.present()
                if w.sum() <= 0:
                    raise DataError(
                        "no decodable sample left in the pools: "
                        + "; ".join(stats.bad_examples[:3])
                    )
                c = int(rng.choice(len(w), p=w / w.sum()))
            s = pools.draw(c)
            pools.add(next(stream))  # the stream moves on as samples are used
            if not decode_it:
                return None, s
            try:
                img = images.decode(s.data)
            except Exception:  # any decoder failure: count, report, draw again
                pools.discard(s)
                stats.record_bad(s, "skipped", self.cfg.max_bad_fraction)
                continue
            stats.decoded += 1
            return img, s

    def _draw_fundus(
        self, rng, weights, f_pools, f_stream, stats, decode_it: bool
    ) -> tuple[list[torch.Tensor | None], list[RawSample]]:
        f_imgs, f_s = [], []
        for _ in range(self.cfg.batch_size):
            x, fs = self._pick(
                rng, f_pools, f_stream, stats, self.images, weights, decode_it=decode_it
            )
            f_imgs.append(x)
            f_s.append(fs)
        return f_imgs, f_s

    def _add_partners(
        self, batch: Batch | None, f_s: list[RawSample], partner, stats, decode_it: bool, seed: int
    ) -> Batch | None:
        """Each fundus sample's OCT partner. As released: the same label when OCT has that class
        (or the class ``partner_classes`` maps it to), else a random OCT sample with its own
        label (counted)."""
        rng, o_pools, o_stream = partner
        o_imgs, o_s = [], []
        o_uniform = np.ones(len(o_pools.pools))
        for fs in f_s:
            want = fs.label if self.partner_classes is None else self.partner_classes[fs.label]
            y, os_ = self._pick(
                rng, o_pools, o_stream, stats, self.oct_images, o_uniform, want, decode_it
            )
            stats.unmatched_oct += int(os_.label != want)
            o_imgs.append(y)
            o_s.append(os_)
        if not decode_it:
            return None
        image, aug = self.oct_images.collate(o_imgs, seed)
        return replace(
            batch,
            partner_image=image,
            partner_aug=aug,
            partner_label=_labels(o_s),
            partner_keys=[s.key for s in o_s],
            partner_meta=[s.metadata() for s in o_s],
            stats=stats.snapshot(),
        )


class _LogicalStream:
    """One logical stream of a training epoch: class-balanced draws from its share of the shards,
    batch after batch. `batch(k)` makes the draws of the batches before k that this worker does
    not yield (without decoding: another worker, or the part of the epoch already trained,
    yields them), then batch k itself."""

    def __init__(
        self,
        owner: PairedTrainStream,
        seed: int,
        p_seed: int,
        rng: np.random.Generator,
        weights: np.ndarray,
        f_pools: ClassPools,
        f_stream: Iterator[RawSample],
        partner: tuple | None,
        stats: StreamStats,
    ):
        self.owner, self.seed, self.p_seed, self.rng = owner, seed, p_seed, rng
        self.weights, self.f_pools, self.f_stream = weights, f_pools, f_stream
        self.partner, self.stats = partner, stats
        self.next = 0  # the next batch index whose draws are not made yet

    def batch(self, k: int) -> Batch:
        if k < self.next:
            raise AssertionError(f"batch {k} of a logical stream asked after batch {self.next}")
        while self.next < k:
            self._make(self.next, decode_it=False)
            self.next += 1
        self.next += 1
        batch = self._make(k, decode_it=True)
        assert batch is not None
        return batch

    def _make(self, b: int, decode_it: bool) -> Batch | None:
        owner, stats = self.owner, self.stats
        with rng_scope(new_rng_state(_seed(self.seed, b))):
            f_imgs, f_s = owner._draw_fundus(
                self.rng, self.weights, self.f_pools, self.f_stream, stats, decode_it
            )
        batch = None
        if decode_it:
            batch = _collate(f_imgs, f_s, stats, owner.images, _seed(self.seed, b, AUG_SEED))
        if self.partner is not None:
            with rng_scope(new_rng_state(_seed(self.p_seed, b))):
                batch = owner._add_partners(
                    batch, f_s, self.partner, stats, decode_it, _seed(self.p_seed, b, AUG_SEED)
                )
        return batch


# ---------------------------------------------------------------- evaluation stream


class EvalStream(IterableDataset):
    """Every sample of a split exactly once over all ranks and workers; undecodable samples are
    skipped and reported in `stats` (they cannot be scored)."""

    def __init__(
        self,
        shards: ShardSet,
        image_size: int,
        batch_size: int,
        rank: int | None = None,
        world: int | None = None,
        max_bad_fraction: float = 0.01,
        augment_on: str = "auto",
    ):
        self.shards, self.batch_size = shards, batch_size
        # device: uint8 at the stored size; the resize and crop run where the model does.
        self.images = image_pipeline(augment_on, image_size, augment=False)
        self.rank, self.world = rank_world(rank, world)
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = identity(self.rank, self.world)
        units = make_units(self.shards, world * workers)[rank * workers + worker :: world * workers]
        stats, images, samples = StreamStats(worker=worker), [], []
        for unit in units:
            for s in read_unit(unit, self.shards.image_ext, stats, self.max_bad_fraction):
                try:
                    img = self.images.decode(s.data)
                except Exception:  # any decoder failure: count, report, go on
                    stats.record_bad(s, "not scored", self.max_bad_fraction)
                    continue
                stats.decoded += 1
                images.append(img)
                samples.append(s)
                if len(samples) == self.batch_size:
                    yield _collate(images, samples, stats, self.images, 0)
                    images, samples = [], []
        check_bad(stats, self.max_bad_fraction, final=True)
        if samples or stats.bad:
            yield _collate(images, samples, stats, self.images, 0)


def _labels(samples: list[RawSample]) -> torch.Tensor:
    return torch.tensor([s.label for s in samples], dtype=torch.long)


def _collate(
    images: list[torch.Tensor],
    samples: list[RawSample],
    stats: StreamStats,
    pipeline: HostImages | DeviceImages,
    seed: int,
) -> Batch:
    image, aug = pipeline.collate(images, seed)
    return Batch(
        image=image,
        aug=aug,
        label=_labels(samples),
        keys=[s.key for s in samples],
        meta=[s.metadata() for s in samples],
        stats=stats.snapshot(),
    )


def gather_records(records: list[dict]) -> list[dict] | None:
    """All ranks' records on rank 0 (None elsewhere), sorted by key: a stable order whatever the
    number of ranks and workers. Without a process group, the records themselves, sorted."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(records, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["key"])


def make_loader(dataset: IterableDataset, num_workers: int):
    """A DataLoader over a batch-yielding stream: decoding and augmentation in the workers,
    batches in pinned memory when a GPU will take them."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available()
    )
