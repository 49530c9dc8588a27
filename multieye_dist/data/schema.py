"""The members of one sample in a shard: the single place their names and encodings live.

A WebDataset sample is the tar members ``KEY.EXT`` that share a key. Ours are::

    KEY.<image_ext>   the encoded image (png, jpg or webp; the manifest's ``image_ext``)
    KEY.cls           the class index as ASCII digits ("3")
    KEY.json          metadata: name, label, modality, split, original_size (sorted keys),
                      and ``findings`` (sorted distinct finding indices) where the source has a
                      findings sidecar (synthetic data; see multieye_dist.data.layout)

The shard writer (:mod:`multieye_dist.data.shards`), the verifier
(:mod:`multieye_dist.data.verify`) and the training and evaluation streams
(:mod:`multieye_dist.data.stream`) all go through this module, so a new member is added here and
nowhere else. Parsing a label checks its range: a bad label is an error naming the shard and the
sample where the sample is read, once, instead of a check on every training step.
"""

from __future__ import annotations

import json
from typing import Any

from multieye_dist.data.classes import NUM_CLASSES

KEY = "__key__"  # webdataset's name for the sample key
LABEL = "cls"
META = "json"
FINDINGS = "findings"  # key of the json record: the sample's latent findings, when known
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "webp")


class SampleError(ValueError):
    """A sample's members are missing or malformed; the message names where."""


def encode_sample(
    key: str, image_ext: str, image: bytes, label: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """The tar members of one sample, as :func:`multieye_dist.data.tario.write_samples` takes
    them."""
    if image_ext not in IMAGE_FORMATS:
        raise ValueError(f"image_ext {image_ext!r}: expected one of {IMAGE_FORMATS}")
    return {
        KEY: key,
        image_ext: image,
        LABEL: str(label).encode(),
        META: json.dumps(meta, sort_keys=True).encode(),
    }


def missing_members(sample: dict[str, Any], image_ext: str) -> list[str]:
    return [m for m in (image_ext, LABEL, META) if m not in sample]


def parse_label(raw: bytes | str, where: str) -> int:
    """The class index of a ``.cls`` member, in [0, NUM_CLASSES)."""
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"{where}: .{LABEL} {raw[:20]!r} is not an integer") from None
    if not 0 <= label < NUM_CLASSES:
        raise SampleError(f"{where}: label {label} outside 0..{NUM_CLASSES - 1}")
    return label


def parse_meta(raw: bytes | None, where: str) -> dict[str, Any]:
    """The ``.json`` member as a dict ({} when the sample has none: shards of other tools)."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise SampleError(f"{where}: .{META} record does not parse ({exc})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{where}: .{META} record is {type(meta).__name__}, not an object")
    return meta


def check_findings(meta: dict[str, Any], where: str) -> list[int] | None:
    """The json record's ``findings`` (None when absent): a sorted list of distinct non-negative
    ints, or a SampleError naming the sample."""
    if FINDINGS not in meta:
        return None
    value = meta[FINDINGS]
    ok = isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)
    if not ok or any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise SampleError(
            f"{where}: .{META} {FINDINGS} {value!r} is not a sorted list of distinct "
            "non-negative integers"
        )
    return value
