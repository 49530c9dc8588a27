"""Re-read every shard against its manifest: counts, checksums, decodable images, valid labels
(and, where a json record has them, valid findings)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from multieye_dist.data import schema
from multieye_dist.data.classes import NUM_CLASSES, manifest_class_names
from multieye_dist.data.shards import SHARD_RE, sha256_file
from multieye_dist.data.tario import iter_samples
from multieye_dist.data.workers import process_pool

logger = logging.getLogger(__name__)


@dataclass
class ShardCheck:
    name: str
    problems: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=lambda: [0] * NUM_CLASSES)
    keys: list[str] = field(default_factory=list)


def _check_sample(
    sample: dict, ext: str, where: str, num_classes: int = NUM_CLASSES
) -> tuple[int | None, list[str]]:
    """Returns (label or None, problems) for one decoded-from-tar sample."""
    problems = []
    missing = schema.missing_members(sample, ext)
    if missing:
        return None, [f"{where}: missing member(s) {', '.join('.' + m for m in missing)}"]
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
    except Exception as exc:  # any decoder failure is a finding, not a crash
        problems.append(f"{where}: image does not decode ({exc})")
    try:
        label = schema.parse_label(sample[schema.LABEL], where, num_classes)
    except schema.SampleError as exc:
        return None, [*problems, str(exc)]
    try:
        meta = schema.parse_meta(sample[schema.META], where)
    except schema.SampleError as exc:
        return label, [*problems, str(exc)]
    try:
        schema.check_label(meta, label, where)
    except schema.SampleError as exc:
        problems.append(str(exc))
    try:
        schema.check_findings(meta, where)
    except schema.SampleError as exc:
        problems.append(str(exc))
    return label, problems


def check_shard(path: Path, entry: dict, ext: str) -> ShardCheck:
    """Checksum, then every sample decoded; labels within the manifest's classes (the length of
    the entry's class_counts, checked against class_names when the manifest was loaded)."""
    num_classes = len(entry["class_counts"])
    check = ShardCheck(path.name, class_counts=[0] * num_classes)
    if not path.is_file():
        check.problems.append(f"{path}: shard listed in the manifest is missing")
        return check
    if sha256_file(path) != entry["sha256"]:
        check.problems.append(f"{path}: sha256 differs from the manifest")
    try:
        for sample in iter_samples(path):
            where = f"{path.name}:{sample[schema.KEY]}"
            check.keys.append(sample[schema.KEY])
            label, problems = _check_sample(sample, ext, where, num_classes)
            check.problems += problems
            if label is not None:
                check.class_counts[label] += 1
    except Exception as exc:  # a truncated or corrupt tar: report, don't crash the verifier
        check.problems.append(f"{path}: unreadable tar ({type(exc).__name__}: {exc})")
    n = len(check.keys)
    if n != entry["samples"]:
        check.problems.append(f"{path}: {n} samples, manifest says {entry['samples']}")
    elif check.class_counts != entry["class_counts"]:
        check.problems.append(
            f"{path}: class counts {check.class_counts} != manifest {entry['class_counts']}"
        )
    return check


@dataclass
class VerifyReport:
    problems: list[str]
    groups: list[tuple[str, int, int]]  # (group, samples, shards)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        rows = [f"{g:<14}{n:>9} samples{s:>6} shards" for g, n, s in self.groups]
        rows += [f"PROBLEM {p}" for p in self.problems]
        rows.append("verify: OK" if self.ok else f"verify: {len(self.problems)} problem(s)")
        return "\n".join(rows)


def _load_manifests(root: Path, problems: list[str]) -> list[tuple[Path, dict]]:
    """Every manifest of `root` that parses and has the fields the checks use; each one that
    does not is a problem naming it and the field (never a traceback)."""
    manifests = []
    for path in sorted(root.glob("*.manifest.json")):
        modality, dash, split = path.name.removesuffix(".manifest.json").partition("-")
        try:
            m = schema.load_manifest(path, modality if dash else None, split if dash else None)
            manifests.append((path, m))
        except schema.ManifestError as exc:
            problems.append(str(exc))
    if not manifests and not problems:
        problems.append(f"{root}: no *.manifest.json found (conversion incomplete or wrong dir)")
    return manifests


def verify(shards: Path, workers: int = 1) -> VerifyReport:
    root = Path(shards)
    problems: list[str] = []
    if not root.is_dir():
        return VerifyReport([f"{root}: not a directory"], [])
    manifests = _load_manifests(root, problems)
    for path, m in manifests[1:]:  # one directory, one class list: a label means one class
        first_path, first = manifests[0]
        if manifest_class_names(m) != manifest_class_names(first):
            problems.append(
                f"{path.name}: class_names {list(manifest_class_names(m))} differ from "
                f"{first_path.name}'s {list(manifest_class_names(first))}"
            )
    jobs = [(root / e["name"], e, m["image_ext"]) for _, m in manifests for e in m["shards"]]
    if workers > 1 and len(jobs) > 1:
        with process_pool(min(workers, len(jobs))) as pool:
            checks = list(pool.map(check_shard, *zip(*jobs, strict=True)))
    else:
        checks = [check_shard(*job) for job in jobs]
    by_name = {c.name: c for c in checks}
    groups = []
    for path, m in manifests:
        group = [by_name[e["name"]] for e in m["shards"]]
        for c in group:
            problems += c.problems
        keys = Counter(k for c in group for k in c.keys)
        dup = [k for k, n in keys.items() if n > 1]
        if dup:
            problems.append(f"{path.name}: {len(dup)} duplicate key(s), e.g. {dup[0]}")
        total = sum(keys.values())
        if total != m["num_samples"]:
            want = m["num_samples"]
            problems.append(f"{path.name}: {total} samples in shards, manifest says {want}")
        groups.append((f"{m['modality']}-{m['split']}", total, len(group)))
    listed = {e["name"] for _, m in manifests for e in m["shards"]}
    for tar in sorted(root.glob("*.tar")):
        if SHARD_RE.match(tar.name) and tar.name not in listed:
            problems.append(f"{tar}: shard not listed in any manifest")
    return VerifyReport(problems, groups)
