"""MultiEYE layout (or an ImageFolder tree, or a CSV: :func:`layout.read_source`) -> WebDataset
tar shards, one set per modality and split. Every manifest records the class names
(``class_names``), which the training and evaluation code read from it.

Design (why it is safe to kill, rerun and parallelise):
- The *plan* is computed from the label files alone: every shard's sample list is known before
  any image is read, so shards are independent tasks (process pool here, Slurm array tasks in
  `shards/convert_slurm.py`) and byte-identical whatever the worker count.
- A shard is streamed to a temporary name, fsynced and renamed (`multieye_dist.core.atomic`, hashed
  as it is written: a shard is never held in memory); then a small progress record (its sha256
  and the fingerprint of its inputs and options) is written the same way.
- A rerun keeps a shard whose record matches the plan's fingerprint and whose bytes still hash to
  the recorded sha256, and redoes the rest. The manifest is written last, from the records.
- A rerun over a complete conversion (a group whose manifest exists) keeps that manifest and its
  shards usable until it succeeds: a redone shard is *staged* (written to ``.progress/NAME.tar``,
  recorded like any other), and only once every shard of the plan is done are the staged ones
  renamed into place, the shards left over from the old plan removed and the manifest rewritten.
  A rerun that fails on newly bad input leaves the old manifests and shards as they were (the
  staged shards wait for the next run); the price is disk room for the redone shards twice.
  Temporary files of killed runs are removed when the next run starts (``prepare_out``).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from multieye_dist import __version__
from multieye_dist.core.atomic import move_into_place, open_atomic, remove_temp_files, write_text
from multieye_dist.data import schema
from multieye_dist.data.classes import DEFAULT_CLASS_NAMES, NUM_CLASSES
from multieye_dist.data.layout import (
    INPUT_FORMATS,
    LABEL_FILE,
    MODALITIES,
    SPLITS,
    BadSample,
    LayoutError,
    SourceSample,
    attach_findings,
    finding_names,
    read_source,
)
from multieye_dist.data.preprocess import BadImageError, Preprocess, process_image
from multieye_dist.data.tario import write_samples
from multieye_dist.data.workers import process_pool, resolve_workers

logger = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
SHARD_RE = re.compile(r"^(fundus|oct)-(train|dev|test)-(\d{6})\.tar$")
# Three tar members per sample (image, cls, json), each a 512-byte header plus padding.
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 3 * 256 + 200


class ConversionError(RuntimeError):
    """A sample could not be converted and --skip-bad was not given."""


@dataclass(frozen=True)
class ConvertOptions:
    modalities: tuple[str, ...] = MODALITIES
    splits: tuple[str, ...] = SPLITS
    shard_samples: int = 1000
    shard_bytes: int = 0  # > 0: target bytes per shard, overrides shard_samples (see plan)
    preprocess: Preprocess = field(default_factory=Preprocess)
    workers: int = 0  # 0 = all cores
    skip_bad: bool = False
    label_file: str = LABEL_FILE
    input_format: str = "auto"  # multieye, imagefolder, csv; auto: from what --root is

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"--input-format {self.input_format!r}: choose from {', '.join(INPUT_FORMATS)}"
            )
        for m in self.modalities:
            if m not in MODALITIES:
                raise ValueError(f"--modality {m!r}: choose from {', '.join(MODALITIES)}, both")
        for s in self.splits:
            if s not in SPLITS:
                raise ValueError(f"--splits {s!r}: choose from {', '.join(SPLITS)}")
        if self.shard_samples < 1:
            raise ValueError(f"--shard-samples {self.shard_samples}: must be >= 1")
        if self.shard_bytes < 0:
            raise ValueError(f"--shard-bytes {self.shard_bytes}: must be >= 0")

    def n_workers(self) -> int:
        return resolve_workers(self.workers)


@dataclass(frozen=True)
class ShardTask:
    modality: str
    split: str
    index: int
    start: int  # position of the shard's first sample in its label file's sample list
    samples: tuple[SourceSample, ...]
    fingerprint: str
    num_classes: int = NUM_CLASSES  # length of the shard's class_counts

    @property
    def name(self) -> str:
        return shard_name(self.modality, self.split, self.index)


@dataclass
class Plan:
    tasks: list[ShardTask]
    # (modality, split) -> samples listed but not convertible (only with skip_bad)
    bad: dict[tuple[str, str], list[BadSample]]
    listed: dict[tuple[str, str], int]
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    input_format: str = "multieye"


def shard_name(modality: str, split: str, index: int) -> str:
    return f"{modality}-{split}-{index:06d}.tar"


def manifest_name(modality: str, split: str) -> str:
    return f"{modality}-{split}.manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _preprocess_key(pp: Preprocess) -> dict:
    """The preprocessing options as they enter the fingerprint. `max_size` came later: unset, it
    is left out, so shards written before it existed (same effective options) are kept."""
    key = pp.to_dict()
    if key["max_size"] is None:
        del key["max_size"]
    return key


def _fingerprint(
    modality: str, split: str, index: int, start: int, samples, options, class_names=None
) -> str:
    h = hashlib.sha256()
    head = {"v": __version__, "pp": _preprocess_key(options.preprocess), "m": modality, "s": split}
    if class_names is not None and tuple(class_names) != DEFAULT_CLASS_NAMES:
        # A label's meaning changed: the shard is redone. (The default is left out, so shards
        # written before class lists existed are kept.)
        head["classes"] = list(class_names)
    h.update(json.dumps({**head, "i": index, "start": start}, sort_keys=True).encode())
    for s in samples:
        st = s.path.stat()  # a changed source image invalidates the shard holding it
        h.update(f"\n{s.name}\t{s.label}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        if s.findings is not None:  # the sidecar's line for this sample (absent: as before)
            h.update(f"\tfindings={','.join(map(str, s.findings))}".encode())
    return h.hexdigest()


def _samples_per_shard(samples: list[SourceSample], modality: str, options: ConvertOptions) -> int:
    """Sample count per shard. With a byte target, encode a fixed, evenly spaced subset to
    estimate the bytes per sample: the plan stays a pure function of inputs and options."""
    if options.shard_bytes <= 0 or not samples:
        return options.shard_samples
    probe = samples[:: max(1, len(samples) // 32)][:32]
    sizes = []
    for s in probe:
        try:
            sizes.append(len(process_image(s.path, modality, options.preprocess)[0]))
        except BadImageError:
            continue  # reported when its shard is written
    per_sample = (sum(sizes) / len(sizes) if sizes else 1) + TAR_OVERHEAD_PER_SAMPLE
    return max(1, int(options.shard_bytes // per_sample))


def make_plan(root: Path, options: ConvertOptions) -> Plan:
    """Validate the layout (label files, then findings sidecars) and assign samples to shards;
    raises before anything is written."""
    layout, class_names, fmt = read_source(
        Path(root), options.input_format, options.modalities, options.splits, options.label_file
    )
    bad_all = [b for _, bad in layout.values() for b in bad]
    if bad_all and not options.skip_bad:
        more = f" (and {len(bad_all) - 1} more)" if len(bad_all) > 1 else ""
        raise LayoutError(f"{bad_all[0].describe()}{more}; fix it or pass --skip-bad")
    if fmt == "multieye":
        layout = attach_findings(Path(root), layout)  # a sidecar problem is never skipped
    tasks: list[ShardTask] = []
    for (modality, split), (samples, _) in layout.items():
        per = _samples_per_shard(samples, modality, options)
        for index, start in enumerate(range(0, max(len(samples), 1), per)):
            chunk = tuple(samples[start : start + per])
            fp = _fingerprint(modality, split, index, start, chunk, options, class_names)
            tasks.append(ShardTask(modality, split, index, start, chunk, fp, len(class_names)))
    return Plan(
        tasks=tasks,
        bad={k: bad for k, (_, bad) in layout.items()},
        listed={k: len(samples) + len(bad) for k, (samples, bad) in layout.items()},
        class_names=class_names,
        input_format=fmt,
    )


def _sample_key(task: ShardTask, position: int) -> str:
    # Dots would split WebDataset keys, and names may contain them: keys are positional,
    # the original name is in the json record.
    return f"{task.modality}-{task.split}-{task.start + position:09d}"


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it to `fh`: the
    shard's sha256 without holding the shard in memory or reading it back."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


def _write_shard(task: ShardTask, path: Path, pp: Preprocess, skip_bad: bool) -> dict:
    """Encode one shard straight into `path` (atomically); returns its record. A bad sample
    without skip_bad raises and leaves neither `path` nor a temporary file."""
    counts: Counter[int] = Counter()
    skipped: list[dict] = []

    def samples():
        for pos, s in enumerate(task.samples):
            try:
                data, original = process_image(s.path, task.modality, pp)
            except BadImageError as exc:
                bad = BadSample(str(s.label_file), s.line, s.name, str(exc))
                if not skip_bad:
                    raise ConversionError(f"{bad.describe()}; fix it or pass --skip-bad") from exc
                skipped.append(bad.to_dict())
                continue
            meta = {
                "name": s.name,
                "label": s.label,
                "modality": task.modality,
                "split": task.split,
                "original_size": list(original),
            }
            if s.findings is not None:
                meta[schema.FINDINGS] = list(s.findings)
            counts[s.label] += 1
            yield schema.encode_sample(_sample_key(task, pos), pp.fmt, data, s.label, meta)

    with open_atomic(path, "wb") as fh:
        sink = _HashingWriter(fh)
        write_samples(sink, samples())
    return {
        "name": task.name,
        "fingerprint": task.fingerprint,
        "samples": sum(counts.values()),
        "class_counts": [counts.get(c, 0) for c in range(task.num_classes)],
        "skipped": skipped,
        "sha256": sink.sha256.hexdigest(),
        "bytes": sink.bytes,
    }


def _record_path(out: Path, name: str) -> Path:
    return out / PROGRESS_DIR / f"{name}.json"


def _staged_path(out: Path, name: str) -> Path:
    """Where a redone shard of a group that has a manifest waits to be published."""
    return out / PROGRESS_DIR / name


def _find_done(out: Path, task: ShardTask) -> tuple[dict, Path] | None:
    """The shard's record and file if a complete shard matching the plan is on disk (staged,
    or in place), else None."""
    rec_path = _record_path(out, task.name)
    if not rec_path.is_file():
        return None
    try:
        record = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != task.fingerprint:
        return None
    present = [p for p in (_staged_path(out, task.name), out / task.name) if p.is_file()]
    for shard in present:
        if sha256_file(shard) == record.get("sha256"):
            return record, shard
    if present:
        logger.warning("%s: checksum differs from its progress record; rewriting", present[-1])
    return None


def load_done(out: Path, task: ShardTask) -> dict | None:
    """The shard's record if a complete shard matching the plan is on disk, else None."""
    found = _find_done(out, task)
    return None if found is None else found[0]


def run_task(task: ShardTask, out: Path, pp: Preprocess, skip_bad: bool) -> dict:
    """Write one shard (or keep it if already done); returns its record with a 'kept' flag.
    In a group with a manifest the shard is staged (see the module's docstring)."""
    out = Path(out)
    record = load_done(out, task)
    if record is not None:
        return {**record, "kept": True}
    in_use = (out / manifest_name(task.modality, task.split)).is_file()
    target = _staged_path(out, task.name) if in_use else out / task.name
    record = _write_shard(task, target, pp, skip_bad)
    write_text(_record_path(out, task.name), json.dumps(record, sort_keys=True))
    return {**record, "kept": False}


def prepare_out(out: Path, plan: Plan | None = None) -> None:
    """Create OUT and drop the temporary files of killed runs (no writer runs yet). Manifests
    stay: they describe the previous complete conversion until write_manifests replaces them.
    (`plan` is no longer needed; callers such as shards/convert_slurm.py still pass it.)"""
    out = Path(out)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for d in (out, out / PROGRESS_DIR):
        remove_temp_files(d)


def run_tasks(
    tasks: list[ShardTask], out: Path, options: ConvertOptions, progress: bool = True
) -> list[dict]:
    """Run shard tasks in parallel; on the first failure cancel what has not started and raise."""
    from tqdm import tqdm

    pp, skip_bad = options.preprocess, options.skip_bad
    results: dict[str, dict] = {}
    bar = tqdm(
        total=sum(len(t.samples) for t in tasks),
        unit="img",
        desc="convert",
        disable=not progress,
        dynamic_ncols=True,
    )
    workers = min(options.n_workers(), max(1, len(tasks)))
    try:
        if workers == 1:
            for t in tasks:
                results[t.name] = run_task(t, out, pp, skip_bad)
                bar.update(len(t.samples))
        else:
            with process_pool(workers) as pool:
                futures = {pool.submit(run_task, t, out, pp, skip_bad): t for t in tasks}
                try:
                    for fut in cf.as_completed(futures):
                        results[futures[fut].name] = fut.result()
                        bar.update(len(futures[fut].samples))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return [results[t.name] for t in tasks]


def write_manifests(root: Path, out: Path, plan: Plan, options: ConvertOptions) -> list[dict]:
    """Write one manifest per (modality, split) from the progress records; last step of a run.

    Every planned shard must be complete (a Slurm array task may have failed): otherwise this
    raises, naming the missing shards, and changes nothing. Then, per group, staged shards are
    published (the old manifest is removed first: from then on it no longer describes the
    directory; a kill here is finished by the next run) and the new manifest written.
    """
    out = Path(out)
    groups: dict[tuple[str, str], list[dict]] = {k: [] for k in plan.listed}
    places: dict[str, Path] = {}
    missing = []
    for task in plan.tasks:
        found = _find_done(out, task)
        if found is None:
            missing.append(task.name)
        else:
            groups[(task.modality, task.split)].append(found[0])
            places[task.name] = found[1]
    if missing:
        raise ConversionError(
            f"{len(missing)} shard(s) not complete in {out}: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; rerun the conversion to finish them"
        )
    manifests = []
    for (modality, split), records in groups.items():
        _publish(out, modality, split, {r["name"]: places[r["name"]] for r in records})
        manifest = _manifest(root, modality, split, records, plan, options)
        write_text(
            out / manifest_name(modality, split),
            json.dumps(manifest, indent=1, sort_keys=True) + "\n",
        )
        manifests.append(manifest)
    return manifests


def _publish(out: Path, modality: str, split: str, places: dict[str, Path]) -> None:
    """Make the group's directory hold exactly the shards of `places` (name -> where the
    complete shard is): staged ones renamed into place, stale staged copies and shards of an
    earlier plan removed. The old manifest goes first if anything changes."""
    staged = {name: p for name, p in places.items() if p != out / name}
    stale = [p for p in (out / PROGRESS_DIR).glob(f"{modality}-{split}-*.tar") if p.is_file()]
    stale = [p for p in stale if staged.get(p.name) != p]
    orphans = [
        p
        for p in out.glob(f"{modality}-{split}-*.tar")
        if SHARD_RE.match(p.name) and p.name not in places
    ]
    if staged or orphans:
        (out / manifest_name(modality, split)).unlink(missing_ok=True)
    for name, path in sorted(staged.items()):
        move_into_place(path, out / name)
    for path in stale:
        path.unlink(missing_ok=True)  # staged by a run whose plan this one replaced
    for path in orphans:
        logger.info("removing %s: not part of the current plan", path)
        path.unlink()
        _record_path(out, path.name).unlink(missing_ok=True)


def _manifest(root, modality, split, records, plan, options) -> dict:
    n_classes = len(plan.class_names)
    class_counts = [sum(r["class_counts"][c] for r in records) for c in range(n_classes)]
    skipped = [b.to_dict() for b in plan.bad[(modality, split)]]
    skipped += [s for r in records for s in r["skipped"]]
    n = len(records)
    findings = {}
    group = [t for t in plan.tasks if (t.modality, t.split) == (modality, split)]
    if any(s.findings is not None for t in group for s in t.samples):  # a findings sidecar
        findings = {"finding_names": finding_names(root)}  # None without findings.json
    return {
        **findings,
        "format": "multieye-dist shards/1",
        "tool_version": __version__,
        "modality": modality,
        "split": split,
        "source_root": str(Path(root).resolve()),
        "label_file": options.label_file,
        "class_names": list(plan.class_names),
        "input_format": plan.input_format,
        "image_ext": options.preprocess.fmt,
        "preprocessing": {
            **options.preprocess.to_dict(),
            "pad_to_square": True,
            "clahe": options.preprocess.clahe and modality == "fundus",
            "median": options.preprocess.median if modality == "oct" else 0,
        },
        "num_listed": plan.listed[(modality, split)],
        "num_samples": sum(r["samples"] for r in records),
        "class_counts": class_counts,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "urls": f"{modality}-{split}-{{000000..{max(n - 1, 0):06d}}}.tar",
        "shards": [
            {k: r[k] for k in ("name", "samples", "bytes", "sha256", "class_counts")}
            for r in records
        ],
    }


@dataclass
class ConvertSummary:
    manifests: list[dict]
    written: int | None = None  # None: written elsewhere (array tasks)
    kept: int | None = None

    def table(self) -> str:
        rows = [f"{'group':<14}{'samples':>9}{'shards':>8}{'MiB':>9}{'skipped':>9}"]
        for m in self.manifests:
            mib = sum(s["bytes"] for s in m["shards"]) / 2**20
            rows.append(
                f"{m['modality'] + '-' + m['split']:<14}{m['num_samples']:>9}"
                f"{len(m['shards']):>8}{mib:>9.1f}{m['num_skipped']:>9}"
            )
        if self.written is not None:
            rows.append(f"shards written {self.written}, kept from an earlier run {self.kept}")
        for m in self.manifests:
            for s in m["skipped"]:
                rows.append(f"skipped {s['label_file']}:{s['line']} ({s['name']}): {s['reason']}")
        return "\n".join(rows)


def convert(
    root: Path, out: Path, options: ConvertOptions, progress: bool = True
) -> ConvertSummary:
    """Plan, write every shard (in parallel), then the manifests."""
    plan = make_plan(root, options)
    prepare_out(Path(out), plan)
    results = run_tasks(plan.tasks, Path(out), options, progress)
    manifests = write_manifests(root, out, plan, options)
    kept = sum(r["kept"] for r in results)
    return ConvertSummary(manifests, written=len(results) - kept, kept=kept)


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into at most `parts` contiguous, near-equal, non-empty ranges."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def convert_range(root: Path, out: Path, options: ConvertOptions, lo: int, hi: int) -> int:
    """One array task: re-derive the (deterministic) plan and write shards lo..hi-1 of it."""
    plan = make_plan(root, options)
    results = run_tasks(plan.tasks[lo:hi], Path(out), options, progress=False)
    return len(results)


def finalize(root: Path, out: Path, options: ConvertOptions) -> ConvertSummary:
    """Final step of an array conversion: check every shard, then write the manifests."""
    plan = make_plan(root, options)
    for d in (Path(out), Path(out) / PROGRESS_DIR):  # every array task has ended
        remove_temp_files(d)
    manifests = write_manifests(root, out, plan, options)
    return ConvertSummary(manifests)
