"""The 9 MultiEYE classes, in the released code's label order: the default class list.

A dataset of one's own names its classes (``classes.txt`` beside the label files, the class
folders of an ImageFolder tree, a CSV's label column); ``shards convert`` records them in every
manifest (``class_names``) and everything downstream reads them from there
(:func:`manifest_class_names`). A manifest without the field means these 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CLASS_NAMES: tuple[str, ...] = (
    "normal",
    "dry AMD",
    "central serous chorioretinopathy",
    "diabetic retinopathy",
    "glaucoma",
    "epiretinal membrane",
    "myopia",
    "retinal vein occlusion",
    "wet AMD",
)
CLASS_ABBREV: tuple[str, ...] = ("NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD")
NUM_CLASSES = len(CLASS_NAMES)


DEFAULT_CLASS_NAMES = CLASS_NAMES  # what a dataset that does not name its classes means
CLASSES_FILE = "classes.txt"  # beside the label files: one class name per line, in label order


class ClassNamesError(ValueError):
    """A class list that cannot be used; the message names the file (and line)."""


def read_classes_file(path: Path) -> tuple[str, ...]:
    """The class names of a ``classes.txt``: one per line, in label order. Blank lines are only
    allowed at the end (a trailing newline); a name listed twice is an error naming both lines."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ClassNamesError(f"{path}: not UTF-8 text ({exc})") from None
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    names: list[str] = []
    first: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        name = raw.strip()
        if not name:
            raise ClassNamesError(f"{path}:{lineno}: empty class name (one name per line)")
        if name in first:
            raise ClassNamesError(f"{path}:{lineno}: class {name!r} already on line {first[name]}")
        first[name] = lineno
        names.append(name)
    if not names:
        raise ClassNamesError(f"{path}: no class names (one name per line, in label order)")
    return tuple(names)


def manifest_class_names(manifest: dict) -> tuple[str, ...]:
    """A manifest's class names; one written before the field existed means MultiEYE's 9."""
    names = manifest.get("class_names")
    return DEFAULT_CLASS_NAMES if names is None else tuple(names)


def check_same_classes(a: Sequence[str], where_a: str, b: Sequence[str], where_b: str) -> None:
    """Two sources of one run (fundus and OCT shards, say) must name the same classes in the
    same order: a label index means one disease throughout."""
    if tuple(a) != tuple(b):
        raise ClassNamesError(
            f"class names differ: {where_a} has {list(a)}, {where_b} has {list(b)}; "
            "convert both with the same classes (same classes.txt / class folders)"
        )
