"""Image preprocessing for conversion: zero-pad to square, optional resize, CLAHE, median filter.

Sizes: by default an image keeps its size (its square's side is its longer side) and is never
upscaled: MultiEYE ships fundus at 224 px and OCT at 448 px, and upscaling to the training input
would store and decode several times the bytes for no information (the training and evaluation
transforms resize anyway). `max_size` only shrinks larger images; `image_size` resizes every
image to exactly that side, up or down.

Everything here is deterministic for a given Pillow/OpenCV build, which is what makes a rerun of
the conversion byte-identical.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


@dataclass(frozen=True)
class Preprocess:
    """Per-image preprocessing. CLAHE applies to fundus only, the median filter to OCT only:
    the release ships both already applied, hence off by default.

    After zero-padding to square: `image_size` None (default) keeps the side, `max_size` set
    downscales (bicubic) squares larger than it to it and never upscales; `image_size` set
    resizes to exactly that side, up or down. At most one of the two may be set."""

    image_size: int | None = None  # first field: Preprocess(512) still means --image-size 512
    fmt: str = "png"
    quality: int = 95  # jpg and webp only
    clahe: bool = False
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    median: int = 0  # OCT median filter kernel size, 0 = off (odd sizes only)
    max_size: int | None = None  # cap on the square's side (downscale only); None = no cap

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r}: choose one of {', '.join(FORMATS)}")
        if self.image_size is not None and self.max_size is not None:
            raise ValueError(
                f"--image-size {self.image_size} and --max-size {self.max_size}: give at most "
                "one (--image-size resizes every image to PX, up or down; --max-size only "
                "shrinks images larger than PX; neither keeps each image's size)"
            )
        for option, value in (("--image-size", self.image_size), ("--max-size", self.max_size)):
            if value is not None and value < 8:
                raise ValueError(f"{option} {value}: must be at least 8 pixels")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality {self.quality}: must be in 1..100")
        if self.median and (self.median < 3 or self.median % 2 == 0):
            raise ValueError(f"--median {self.median}: kernel size must be odd and >= 3 (or 0)")

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(path: Path) -> Image.Image:
    """Decode fully (not lazily), so a truncated file fails here rather than in a worker later."""
    try:
        with Image.open(path) as img:
            img.load()
            # OCT B-scans are grey: keep one channel, a third of the bytes; loaders convert to RGB.
            mode = "L" if img.mode in ("L", "I;16", "I", "F") else "RGB"
            return img.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot decode image {path}: {exc}") from exc


def pad_to_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clahe(img: Image.Image, clip: float, tiles: int) -> Image.Image:
    """CLAHE on the lightness channel (LAB), OpenCV's implementation."""
    import cv2  # imported here: only conversions that ask for CLAHE pay for OpenCV

    cv2.setNumThreads(1)  # conversion parallelises over processes already
    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    arr = np.asarray(img)
    if img.mode == "L":
        return Image.fromarray(op.apply(arr))
    lab = cv2.cvtColor(arr, cv2.COLOR_RGB2LAB)
    lab[..., 0] = op.apply(lab[..., 0])
    return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        img.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def process_image(path: Path, modality: str, pp: Preprocess) -> tuple[bytes, tuple[int, int]]:
    """Returns the encoded image and the original (width, height)."""
    img = load_image(path)
    original = img.size
    if modality == "fundus" and pp.clahe:
        img = clahe(img, pp.clahe_clip, pp.clahe_tiles)
    if modality == "oct" and pp.median:
        img = img.filter(ImageFilter.MedianFilter(pp.median))
    img = pad_to_square(img)
    side = output_side(img.size[0], pp)
    if img.size != (side, side):
        img = img.resize((side, side), Image.Resampling.BICUBIC)
    return encode(img, pp.fmt, pp.quality), original


def output_side(side: int, pp: Preprocess) -> int:
    """The stored side of an image whose zero-padded square has side `side`."""
    if pp.image_size is not None:
        return pp.image_size
    if pp.max_size is not None:
        return min(side, pp.max_size)
    return side
