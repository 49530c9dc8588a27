"""The released MultiEYE directory layout, read with line-precise validation.

```
ROOT/assemble/{train,dev,test}/large9cls.txt            fundus, one "name label" per line
ROOT/assemble/train/ImageData/cfp-clahe-224x224/NAME.png (every split's images live under train/)
ROOT/assemble_oct/...                                    OCT, same with oct-filter-448x448
```

Optional, written by ``multieye-dist synth`` (the real MultiEYE has neither): a findings sidecar
next to each label file, ``ROOT/<top>/<split>/findings.txt``, one ``NAME i,j,k`` (0-based finding
indices) or ``NAME -`` (none) line per listed image, and ``ROOT/findings.json`` with the findings'
names and captions in index order. :func:`attach_findings` reads them into the samples.

Optional too: ``classes.txt`` beside the label files (``ROOT/<top>/<split>/classes.txt``), one
class name per line in label order; without it the labels mean MultiEYE's 9 classes. Every
split's and modality's file that exists must list the same names.

Besides this layout, :func:`read_source` reads a dataset of one's own (see
:func:`read_imagefolder`, :func:`read_csv`) into the same (modality, split) -> samples form.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from multieye_dist.data.classes import (
    CLASSES_FILE,
    DEFAULT_CLASS_NAMES,
    NUM_CLASSES,
    check_same_classes,
    read_classes_file,
)

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("fundus", "oct")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
LABEL_FILE = "large9cls.txt"
# modality -> (top directory, image directory under <top>/train/ImageData)
LAYOUT: dict[str, tuple[str, str]] = {
    "fundus": ("assemble", "cfp-clahe-224x224"),
    "oct": ("assemble_oct", "oct-filter-448x448"),
}
IMAGE_SUFFIX = ".png"
FINDINGS_FILE = "findings.txt"  # per split, next to the label file
FINDINGS_JSON = "findings.json"  # at the root: {"findings": [{"index", "name", "caption"}, ...]}


# Fields are separated by ASCII blanks only, and labels and finding indices are ASCII digits:
# str.split() would also split on no-break and other Unicode spaces, and int() would also take
# '+3', '3_0', ' 3' and other scripts' digits ('٣'), none of them what a label file means.
_BLANKS = " \t\r\f\v"
_FIELD_SEP = re.compile(f"[{_BLANKS}]+")
_INTEGER = re.compile(r"-?[0-9]+")


def _fields(text: str) -> list[str]:
    stripped = text.strip(_BLANKS)
    return _FIELD_SEP.split(stripped) if stripped else []


def _ascii_int(raw: str) -> int | None:
    """The value of an optionally negative run of ASCII digits, else None. A leading '-' makes
    any value (-0 too) negative, which callers report as out of range."""
    if not _INTEGER.fullmatch(raw):
        return None
    digits = raw.lstrip("-").lstrip("0") or "0"
    # int() refuses over 4300 digits; any label or index that long is out of range anyway
    value = int(digits) if len(digits) <= 100 else 10**100
    return -max(value, 1) if raw.startswith("-") else value


def _shown(raw: str) -> str:
    return raw if len(raw) <= 20 else raw[:20] + "..."


def _read_lines(path: Path) -> list[str]:
    """A text file's lines, numbered as an editor shows them. A UTF-8 byte-order mark (which
    Windows editors write) is dropped; lines split at newlines only (str.splitlines() would
    also split at form feeds and Unicode separators, shifting every later line number)."""
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as fh:
            return fh.read().split("\n")
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{path}: not UTF-8 text ({exc})") from exc


class LayoutError(ValueError):
    """The dataset root or one of its label files is not usable; the message names the place."""


@dataclass(frozen=True)
class SourceSample:
    """One labelled image as listed in a label file."""

    name: str
    label: int
    path: Path
    label_file: Path
    line: int  # 1-based
    findings: tuple[int, ...] | None = None  # sorted finding indices; None: no sidecar


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be converted, with where it was listed and why."""

    label_file: str
    line: int
    name: str
    reason: str

    def describe(self) -> str:
        who = f" ({self.name})" if self.name else ""
        at = f":{self.line}" if self.line else ""  # 0: not a line of a file (an image found)
        return f"{self.label_file}{at}{who}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


def label_file(root: Path, modality: str, split: str, name: str = LABEL_FILE) -> Path:
    return Path(root) / LAYOUT[modality][0] / split / name


def image_dir(root: Path, modality: str) -> Path:
    top, folder = LAYOUT[modality]
    return Path(root) / top / "train" / "ImageData" / folder


def image_path(root: Path, modality: str, name: str) -> Path:
    return image_dir(root, modality) / f"{name}{IMAGE_SUFFIX}"


def check_root(root: Path, modalities: tuple[str, ...]) -> None:
    """Fail early, naming what is missing, when ROOT is not the released layout."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"dataset root {root} does not exist or is not a directory")
    for modality in modalities:
        top = root / LAYOUT[modality][0]
        if not top.is_dir():
            raise LayoutError(
                f"{root} is not a MultiEYE root: missing directory {top} for modality "
                f"{modality!r} (expected {LAYOUT[modality][0]}/{{train,dev,test}}/{LABEL_FILE})"
            )
        if not image_dir(root, modality).is_dir():
            raise LayoutError(f"missing image directory {image_dir(root, modality)}")


def _parse_line(text: str, num_classes: int = NUM_CLASSES) -> tuple[str, int] | str:
    """Returns (name, label) or the reason the line is malformed."""
    fields = _fields(text)
    if len(fields) != 2:
        got = len(fields)
        return f"malformed line {text.strip()!r}: expected 'name label' (2 fields, got {got})"
    name, raw = fields
    label = _ascii_int(raw)
    if label is None:
        return f"malformed line: label {raw!r} is not an integer (ASCII digits)"
    if not 0 <= label < num_classes:
        return f"label {_shown(raw)} outside 0..{num_classes - 1}"
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        return f"image name {name!r} must be relative and stay inside the image directory"
    return name, label


def read_split(
    root: Path,
    modality: str,
    split: str,
    *,
    seen: dict[str, str],
    label_name: str = LABEL_FILE,
    num_classes: int = NUM_CLASSES,
) -> tuple[list[SourceSample], list[BadSample]]:
    """Read one label file; every bad line is returned as a BadSample (the caller decides).

    `seen` maps image names already listed (in any split of this modality) to "file:line", so a
    name listed twice, which would put one image in two splits, is caught.
    """
    path = label_file(root, modality, split, label_name)
    if not path.is_file():
        raise LayoutError(f"missing label file {path}")
    samples: list[SourceSample] = []
    bad: list[BadSample] = []
    for lineno, text in enumerate(_read_lines(path), start=1):
        if not _fields(text):
            continue  # blank lines (a trailing newline, say) carry no sample
        parsed = _parse_line(text, num_classes)
        if isinstance(parsed, str):
            first = _fields(text)[0]
            bad.append(BadSample(str(path), lineno, first, parsed))
            continue
        name, label = parsed
        if name in seen:
            bad.append(BadSample(str(path), lineno, name, f"duplicate name, first at {seen[name]}"))
            continue
        seen[name] = f"{path}:{lineno}"
        img = image_path(root, modality, name)
        if not img.is_file():
            bad.append(BadSample(str(path), lineno, name, f"missing image {img}"))
            continue
        samples.append(SourceSample(name, label, img, path, lineno))
    if not samples and not bad:
        raise LayoutError(f"empty label file {path}: no 'name label' lines")
    return samples, bad


def read_layout(
    root: Path,
    modalities: tuple[str, ...],
    splits: tuple[str, ...],
    label_name: str = LABEL_FILE,
    num_classes: int = NUM_CLASSES,
) -> dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]]:
    """Read every (modality, split) label file, in a fixed order; labels in 0..num_classes-1."""
    check_root(root, modalities)
    out: dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]] = {}
    for modality in modalities:
        seen: dict[str, str] = {}
        # Always read the splits in canonical order, so "duplicate of" points the same way
        # whatever subset the user asked for.
        for split in SPLITS:
            if split in splits:
                out[(modality, split)] = read_split(
                    root, modality, split, seen=seen, label_name=label_name, num_classes=num_classes
                )
    return out


# --------------------------------------------------------------------------------------------
# Findings sidecar (synthetic data)
# --------------------------------------------------------------------------------------------


def findings_file(root: Path, modality: str, split: str) -> Path:
    return Path(root) / LAYOUT[modality][0] / split / FINDINGS_FILE


def format_findings(findings) -> str:
    """The sidecar's second field: "i,j,k" (sorted) or "-" for none."""
    return ",".join(str(i) for i in sorted(findings)) if len(findings) else "-"


def finding_names(root: Path) -> list[str] | None:
    """The finding names of ROOT/findings.json in index order, or None without the file."""
    path = Path(root) / FINDINGS_JSON
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))["findings"]
        names = [e["name"] for e in entries]
        if [e["index"] for e in entries] != list(range(len(entries))):
            raise ValueError("indices are not 0, 1, 2, ... in order")
        if not all(isinstance(n, str) for n in names):
            raise ValueError("a name is not a string")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{path}: not a findings list ({exc})") from None
    return names


def _parse_findings(text: str, limit: int | None) -> tuple[str, tuple[int, ...]] | str:
    """(name, sorted indices) of one sidecar line, or the reason it is malformed."""
    fields = _fields(text)
    if len(fields) != 2:
        got = len(fields)
        return f"malformed line {text.strip()!r}: expected 'name i,j,k' or 'name -' ({got} fields)"
    name, raw = fields
    if raw == "-":
        return name, ()
    indices = []
    for item in raw.split(","):
        index = _ascii_int(item)
        if index is None:
            return f"malformed line: finding index {item!r} is not an integer (ASCII digits)"
        if index < 0:
            return f"finding index {_shown(item)} is negative"
        if limit is not None and index >= limit:
            listed = f"{FINDINGS_JSON} lists {limit}"
            return f"finding index {_shown(item)} outside 0..{limit - 1} ({listed})"
        if index in indices:
            return f"finding index {index} listed twice"
        indices.append(index)
    return name, tuple(sorted(indices))


def read_findings(
    root: Path, modality: str, split: str, listed: dict[str, SourceSample | BadSample]
) -> tuple[dict[str, tuple[int, ...]] | None, list[BadSample]]:
    """Read one split's sidecar against the names its label file lists (`listed`: name -> the
    sample, or the bad line that named it). Returns (name -> findings, or None without a
    sidecar; problems). A problem is a malformed line, a negative (or, with findings.json,
    too large) index, a name not in the label file or listed twice, or a sample of the label
    file without a line."""
    path = findings_file(root, modality, split)
    if not path.is_file():
        return None, []
    limit = len(names) if (names := finding_names(root)) is not None else None
    lines = _read_lines(path)
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, int] = {}
    bad: list[BadSample] = []
    for lineno, text in enumerate(lines, start=1):
        if not _fields(text):
            continue
        parsed = _parse_findings(text, limit)
        if isinstance(parsed, str):
            bad.append(BadSample(str(path), lineno, _fields(text)[0], parsed))
            continue
        name, findings = parsed
        if name in where:
            bad.append(
                BadSample(
                    str(path), lineno, name, f"name listed twice, first at line {where[name]}"
                )
            )
        elif name not in listed:
            label = label_file(root, modality, split).name
            bad.append(BadSample(str(path), lineno, name, f"unknown name: not listed in {label}"))
        else:
            found[name], where[name] = findings, lineno
    for name, sample in listed.items():
        if isinstance(sample, SourceSample) and name not in found:
            bad.append(BadSample(str(sample.label_file), sample.line, name, f"no line in {path}"))
    return found, bad


def attach_findings(
    root: Path,
    layout: dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]],
) -> dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]]:
    """The layout with every sample's findings from its split's sidecar (where there is one).
    Any sidecar problem is a LayoutError naming the file and line (the first, and how many more)."""
    out, problems = {}, []
    for (modality, split), (samples, bad) in layout.items():
        listed: dict[str, SourceSample | BadSample] = {b.name: b for b in bad if b.name}
        listed.update((s.name, s) for s in samples)
        found, sidecar_bad = read_findings(root, modality, split, listed)
        problems += sidecar_bad
        if found is not None:
            samples = [replace(s, findings=found.get(s.name)) for s in samples]
        out[(modality, split)] = (samples, bad)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LayoutError(f"{problems[0].describe()}{more}")
    return out


# --------------------------------------------------------------------------------------------
# Datasets of one's own: class lists, ImageFolder trees, CSV files
# --------------------------------------------------------------------------------------------

Layout = dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]]
INPUT_FORMATS: tuple[str, ...] = ("auto", "multieye", "imagefolder", "csv")
# Anything Pillow opens is converted; these are the files an ImageFolder tree may hold.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLIT_ALIASES = {"val": "dev"}  # torchvision's and Kaggle's name for the validation split
CSV_COLUMNS: tuple[str, ...] = ("path", "label", "split", "modality")


def multieye_class_names(root: Path, modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The classes of a MultiEYE-layout root: the ``classes.txt`` beside the label files (all
    that exist, in any split and modality, must agree), else MultiEYE's 9."""
    found: tuple[str, ...] | None = None
    first = ""
    for modality in modalities:
        for split in SPLITS:
            path = label_file(root, modality, split, CLASSES_FILE)
            if not path.is_file():
                continue
            names = read_classes_file(path)
            if found is None:
                found, first = names, str(path)
            else:
                check_same_classes(found, first, names, str(path))
    return DEFAULT_CLASS_NAMES if found is None else found


def detect_format(root: Path) -> str:
    """multieye, imagefolder or csv, from what ROOT is; a LayoutError when it is none."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if any((root / top).is_dir() for top, _ in LAYOUT.values()):
        return "multieye"
    if any((root / s).is_dir() for s in (*SPLITS, *SPLIT_ALIASES)):
        return "imagefolder"
    raise LayoutError(
        f"{root}: not a MultiEYE root (assemble/, assemble_oct/), an ImageFolder tree "
        "(train/CLASS/*.png ...) or a .csv file; check --root or pass --input-format"
    )


def _split_dirs(root: Path) -> dict[str, Path]:
    """split -> directory of an ImageFolder tree (``val`` read as ``dev``)."""
    dirs: dict[str, Path] = {}
    for child in sorted(Path(root).iterdir()):
        if not child.is_dir():
            continue  # a README or classes.txt beside the splits
        split = SPLIT_ALIASES.get(child.name, child.name)
        if split not in SPLITS:
            raise LayoutError(
                f"{child}: not a split directory of an ImageFolder tree "
                f"(expected {', '.join(SPLITS)} or val); move it out of {root}"
            )
        if split in dirs:
            raise LayoutError(f"{dirs[split]} and {child} are both the {split} split; keep one")
        dirs[split] = child
    return dirs


def _folder_images(class_dir: Path) -> list[Path]:
    """The images of one class folder; anything else there is an error naming it (a stray
    file is never silently left out of the dataset)."""
    images = []
    for path in sorted(class_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise LayoutError(
                f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)}); "
                "an ImageFolder class folder holds images only"
            )
        images.append(path)
    return images


def read_imagefolder(
    root: Path, modality: str, splits: tuple[str, ...]
) -> tuple[Layout, tuple[str, ...]]:
    """``ROOT/SPLIT/CLASS/IMAGE`` of one modality. The classes are the sorted folder names
    over all splits of the tree (the requested ones or not, so a label index means the same
    class whatever --splits says), or ``ROOT/classes.txt`` when it exists (its order; every
    folder must be listed)."""
    root = Path(root)
    dirs = _split_dirs(root)
    for split in splits:
        if split not in dirs:
            have = ",".join(s for s in SPLITS if s in dirs) or "none"
            raise LayoutError(
                f"missing split directory {root / split}; the tree has {have}: "
                "pass --splits to convert only those"
            )
    folders = {s: sorted(d.iterdir()) for s, d in dirs.items()}
    for split, paths in folders.items():
        for p in paths:
            if not p.is_dir():
                raise LayoutError(f"{p}: a file where class folders belong ({dirs[split]}/CLASS/)")
    present = sorted({p.name for paths in folders.values() for p in paths})
    names = tuple(present)
    if (root / CLASSES_FILE).is_file():
        names = read_classes_file(root / CLASSES_FILE)
        unlisted = [n for n in present if n not in names]
        if unlisted:
            raise LayoutError(f"{root / CLASSES_FILE}: class folder(s) {unlisted} not listed")
    if not names:
        raise LayoutError(f"{root}: no class folders (expected {root}/train/CLASS/IMAGE)")
    index = {n: i for i, n in enumerate(names)}
    out: Layout = {}
    for split in SPLITS:
        if split not in splits:
            continue
        samples = [
            SourceSample(f"{d.name}/{img.name}", index[d.name], img, img, 0)
            for d in folders[split]
            for img in _folder_images(d)
        ]
        if not samples:
            raise LayoutError(f"{dirs[split]}: no images in any class folder")
        out[(modality, split)] = (samples, [])
    return out, names


def _csv_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every non-empty row; a LayoutError for a bad header or text."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise LayoutError(
                    f"{path}:1: header {header} lacks column(s) {missing}; "
                    f"expected {','.join(CSV_COLUMNS)}"
                )
            rows = []
            for row in reader:
                if any((v or "").strip() for k, v in row.items() if k is not None):
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise LayoutError(f"{path}: not CSV ({exc})") from None
    return rows


def _csv_class_names(path: Path, rows: list[tuple[int, dict[str, str]]]) -> tuple[str, ...]:
    """classes.txt beside the CSV, else the label column's names (sorted), else (labels all
    indices) MultiEYE's 9. Names and indices mixed without a classes.txt is ambiguous."""
    beside = path.parent / CLASSES_FILE
    if beside.is_file():
        return read_classes_file(beside)
    labels = [(line, (row["label"] or "").strip()) for line, row in rows]
    numeric = [(line, v) for line, v in labels if _ascii_int(v) is not None]
    named = [(line, v) for line, v in labels if _ascii_int(v) is None and v]
    if numeric and named:
        raise LayoutError(
            f"{path}:{numeric[0][0]}: label {numeric[0][1]!r} is an index but line "
            f"{named[0][0]} names a class ({named[0][1]!r}); use one kind, or put a "
            f"{CLASSES_FILE} beside the CSV"
        )
    return tuple(sorted({v for _, v in named})) if named else DEFAULT_CLASS_NAMES


def _csv_label(raw: str, names: tuple[str, ...]) -> int | str:
    """The class index of a label cell (a class name, or an index), or why it is not one."""
    if raw in names:
        return names.index(raw)
    index = _ascii_int(raw)
    if index is not None and 0 <= index < len(names):
        return index
    return f"label {_shown(raw)!r} is neither a class name nor an index 0..{len(names) - 1}"


def read_csv(
    path: Path, modalities: tuple[str, ...], splits: tuple[str, ...]
) -> tuple[Layout, tuple[str, ...]]:
    """A ``path,label,split,modality`` CSV; image paths relative to the CSV's directory. Rows of
    modalities and splits not asked for are not converted; a split or modality value that is
    none of ours is an error naming the line."""
    path = Path(path)
    rows = _csv_rows(path)
    if not rows:
        raise LayoutError(f"{path}: no rows under the header")
    names = _csv_class_names(path, rows)
    out: Layout = {}
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        split, modality = (row["split"] or "").strip(), (row["modality"] or "").strip()
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise LayoutError(f"{path}:{line}: split {split!r} is not one of {SPLITS} (or val)")
        if modality not in MODALITIES:
            raise LayoutError(f"{path}:{line}: modality {modality!r} is not one of {MODALITIES}")
        if split not in splits or modality not in modalities:
            continue  # not asked for (--splits / --modality)
        samples, bad = out.setdefault((modality, split), ([], []))
        name = (row["path"] or "").strip()
        label = _csv_label((row["label"] or "").strip(), names)
        image = path.parent / name
        if isinstance(label, str) or not name:
            bad.append(BadSample(str(path), line, name, label if name else "empty path"))
        elif (modality, name) in seen:
            first = seen[(modality, name)]
            bad.append(BadSample(str(path), line, name, f"duplicate path, first at line {first}"))
        elif not image.is_file():
            seen[(modality, name)] = line
            bad.append(BadSample(str(path), line, name, f"missing image {image}"))
        else:
            seen[(modality, name)] = line
            samples.append(SourceSample(name, label, image, path, line))
    if not out:
        raise LayoutError(
            f"{path}: no row of modality {'/'.join(modalities)} and split {'/'.join(splits)}"
        )
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], SPLITS.index(kv[0][1])))), names


def read_source(
    root: Path,
    input_format: str,
    modalities: tuple[str, ...],
    splits: tuple[str, ...],
    label_name: str = LABEL_FILE,
) -> tuple[Layout, tuple[str, ...], str]:
    """(layout, class names, input format) of whatever ROOT is: a MultiEYE root, an ImageFolder
    tree (one modality: --modality) or a CSV file; `input_format` "auto" detects it."""
    fmt = detect_format(root) if input_format == "auto" else input_format
    if fmt == "multieye":
        names = multieye_class_names(Path(root), modalities)
        return read_layout(root, modalities, splits, label_name, len(names)), names, fmt
    if fmt == "imagefolder":
        if len(modalities) != 1:
            raise LayoutError(
                f"{root}: an ImageFolder tree holds one modality; pass --modality fundus or oct"
            )
        if not Path(root).is_dir():
            raise LayoutError(f"{root}: not a directory (an ImageFolder tree ROOT/SPLIT/CLASS/)")
        return (*read_imagefolder(root, modalities[0], splits), fmt)
    if fmt == "csv":
        if not Path(root).is_file():
            raise LayoutError(f"{root}: not a file (a path,label,split,modality CSV)")
        return (*read_csv(root, modalities, splits), fmt)
    raise LayoutError(f"--input-format {fmt!r}: choose from {', '.join(INPUT_FORMATS)}")
