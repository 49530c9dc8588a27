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

The manifest (``<modality>-<split>.manifest.json``, written last by ``shards convert``) is checked
here too (:func:`check_manifest`), for the verifier and the streams alike: a malformed one is an
error naming the file and the field, never a KeyError or TypeError deep inside a reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
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


def parse_label(raw: bytes | str, where: str, num_classes: int = NUM_CLASSES) -> int:
    """The class index of a ``.cls`` member, in [0, num_classes) (the manifest's class count)."""
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"{where}: .{LABEL} {raw[:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise SampleError(f"{where}: label {label} outside 0..{num_classes - 1}")
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


def check_label(meta: dict[str, Any], label: int, where: str, required: bool = True) -> None:
    """The json record's ``label`` equals the ``.cls`` label (a record without one: an error only
    when `required`; records of other tools may lack it)."""
    if "label" not in meta and not required:
        return
    value = meta.get("label")
    if type(value) is not int or value != label:
        raise SampleError(f"{where}: .{META} label {value!r} != .{LABEL} {label}")


# ---------------------------------------------------------------- manifests

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that is not what ``shards convert`` writes; the message names file and field."""


def _nonneg_int(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass: refused


def _counts(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(map(_nonneg_int, value))


def _class_names(value: Any) -> bool:
    names = value if isinstance(value, list) else []
    unique = len(set(names)) == len(names)
    return bool(names) and unique and all(isinstance(n, str) and n.strip() for n in names)


def _plain_name(value: Any) -> bool:
    # Joined to the shard directory: a name must not leave it.
    plain = isinstance(value, str) and value not in ("", ".", "..")
    return plain and not re.search(r"[/\\]", value)


_FIELDS = {  # top-level field -> (test, what it must be)
    "modality": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "split": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "image_ext": (lambda v: v in IMAGE_FORMATS, f"one of {', '.join(IMAGE_FORMATS)}"),
    "num_samples": (_nonneg_int, "a non-negative integer"),
    "num_skipped": (_nonneg_int, "a non-negative integer"),
    "shards": (lambda v: isinstance(v, list), "an array"),
}
_SHARD_FIELDS = {  # per shard entry
    "name": (_plain_name, "a plain file name"),
    "samples": (_nonneg_int, "a non-negative integer"),
    "sha256": (lambda v: isinstance(v, str) and bool(_SHA256_RE.match(v)), "64 hex digits"),
}


_REMEDY = "restore the manifest or reconvert the split (multieye-dist shards convert)"
_JSON_TYPES = {
    dict: "object", list: "array", str: "string", int: "integer", float: "number",
    bool: "boolean", type(None): "null",
}  # fmt: skip


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field_error(where: str, name: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: field {name!r} {problem}; {_REMEDY}")


def _counts_spec(n: int) -> dict:
    """class_counts: one count per class (n: the manifest's class_names, else MultiEYE's 9)."""
    return {"class_counts": (lambda v: _counts(v, n), f"an array of {n} non-negative integers")}


def _check_fields(obj: dict, spec: dict, where: str, prefix: str = "") -> None:
    for name, (ok, what) in spec.items():
        if name not in obj:
            raise _field_error(where, prefix + name, "is missing")
        if not ok(obj[name]):
            shown = repr(obj[name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            kind = _json_type(obj[name])
            raise _field_error(where, prefix + name, f"is {shown} ({kind}), expected {what}")


def check_manifest(
    manifest: Any, where: str, modality: str | None = None, split: str | None = None
) -> dict[str, Any]:
    """`manifest` (parsed JSON) if it has every field the readers use, with the right types and
    consistent totals, and (when given) the expected modality and split; else a ManifestError
    naming `where` and the field."""
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"{where}: a JSON {_json_type(manifest)}, not a manifest (a JSON object); {_REMEDY}"
        )
    _check_fields(manifest, _FIELDS, where)
    if "class_names" in manifest and not _class_names(manifest["class_names"]):
        shown = repr(manifest["class_names"])[:40]
        raise _field_error(where, "class_names", f"is {shown}, expected distinct non-empty names")
    # Without the field (shards written before it existed): MultiEYE's 9 classes.
    n_classes = len(manifest.get("class_names") or ()) or NUM_CLASSES
    _check_fields(manifest, _counts_spec(n_classes), where)
    for name, want in (("modality", modality), ("split", split)):
        if want is not None and manifest[name] != want:
            raise _field_error(where, name, f"is {manifest[name]!r}, expected {want!r}")
    seen: set[str] = set()
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise _field_error(where, f"shards[{i}]", f"is a {_json_type(entry)}, not an object")
        _check_fields(entry, _SHARD_FIELDS, where, f"shards[{i}].")
        _check_fields(entry, _counts_spec(n_classes), where, f"shards[{i}].")
        if entry["name"] in seen:
            raise _field_error(where, f"shards[{i}].name", f"{entry['name']!r} is listed twice")
        seen.add(entry["name"])
        if sum(entry["class_counts"]) != entry["samples"]:
            problem = f"sums to {sum(entry['class_counts'])}, not samples={entry['samples']}"
            raise _field_error(where, f"shards[{i}].class_counts", problem)
    total = sum(e["samples"] for e in manifest["shards"])
    if manifest["num_samples"] != total:
        problem = f"is {manifest['num_samples']}, but the shards list {total} samples"
        raise _field_error(where, "num_samples", problem)
    per_class = [sum(e["class_counts"][c] for e in manifest["shards"]) for c in range(n_classes)]
    if manifest["class_counts"] != per_class:
        problem = f"is {manifest['class_counts']}, but the shards sum to {per_class}"
        raise _field_error(where, "class_counts", problem)
    return manifest


def load_manifest(path: Path, modality: str | None = None, split: str | None = None) -> dict:
    """The manifest at `path`, read, parsed and checked (:func:`check_manifest`); whatever is
    wrong with its content is a ManifestError naming the file (and the field). An OSError
    (unreadable file) is left to the caller, as for any other file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: the manifest is not UTF-8 text ({exc}); {_REMEDY}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: the manifest is not JSON ({exc}); {_REMEDY}") from None
    return check_manifest(manifest, str(path), modality, split)
