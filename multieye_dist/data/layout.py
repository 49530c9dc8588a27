"""The released MultiEYE directory layout, read with line-precise validation.

```
ROOT/assemble/{train,dev,test}/large9cls.txt            fundus, one "name label" per line
ROOT/assemble/train/ImageData/cfp-clahe-224x224/NAME.png (every split's images live under train/)
ROOT/assemble_oct/...                                    OCT, same with oct-filter-448x448
```
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from multieye_dist.data.classes import NUM_CLASSES

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


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be converted, with where it was listed and why."""

    label_file: str
    line: int
    name: str
    reason: str

    def describe(self) -> str:
        who = f" ({self.name})" if self.name else ""
        return f"{self.label_file}:{self.line}{who}: {self.reason}"

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


def _parse_line(text: str) -> tuple[str, int] | str:
    """Returns (name, label) or the reason the line is malformed."""
    fields = text.split()
    if len(fields) != 2:
        got = len(fields)
        return f"malformed line {text.strip()!r}: expected 'name label' (2 fields, got {got})"
    name, raw = fields
    try:
        label = int(raw)
    except ValueError:
        return f"malformed line: label {raw!r} is not an integer"
    if not 0 <= label < NUM_CLASSES:
        return f"label {label} outside 0..{NUM_CLASSES - 1}"
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
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise LayoutError(f"{path}: not UTF-8 text ({exc})") from exc
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue  # blank lines (a trailing newline, say) carry no sample
        parsed = _parse_line(text)
        if isinstance(parsed, str):
            first = text.split()[0] if text.split() else ""
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
) -> dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]]:
    """Read every (modality, split) label file, in a fixed order."""
    check_root(root, modalities)
    out: dict[tuple[str, str], tuple[list[SourceSample], list[BadSample]]] = {}
    for modality in modalities:
        seen: dict[str, str] = {}
        # Always read the splits in canonical order, so "duplicate of" points the same way
        # whatever subset the user asked for.
        for split in SPLITS:
            if split in splits:
                out[(modality, split)] = read_split(
                    root, modality, split, seen=seen, label_name=label_name
                )
    return out
