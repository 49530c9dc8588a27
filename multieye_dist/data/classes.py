"""The 9 MultiEYE classes, in the released code's label order."""

from __future__ import annotations

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
