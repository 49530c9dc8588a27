"""Image preprocessing for conversion: zero-pad to square, optional resize, CLAHE, median filter.

Sizes: by default an image keeps its size (its square's side is its longer side) and is never
upscaled: MultiEYE ships fundus at 224 px and OCT at 448 px, and upscaling to the training input
would store and decode several times the bytes for no information (the training and evaluation
transforms resize anyway). `max_size` only shrinks larger images; `image_size` resizes every
image to exactly that side, up or down.

Images as they come: every image is read through :func:`open_image`, which all readers share
(conversion, ``explain``, the training and evaluation loaders). It makes 8-bit grey ('L') or RGB:
high-bit-depth grey (PIL modes I;16*, I, F) is scaled by its bit depth's full range, not clipped
at 255 as PIL's ``convert`` does; transparency is composited over black, the zero padding's colour;
grey stays grey. PIL's decompression-bomb limit is an error in both of its tiers.

Everything here is deterministic for a given Pillow/OpenCV build, which is what makes a rerun of
the conversion byte-identical.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

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
    """Decode fully (not lazily), so a truncated file fails here rather than in a worker later.
    OCT B-scans are grey and stay one channel ('L'), a third of the bytes; loaders make RGB."""
    with open_image(path, str(path)) as img:
        return img.copy()  # open_image closes its image on leaving the block


@contextmanager
def open_image(source: Path | IO[bytes], what: str) -> Iterator[Image.Image]:
    """The image at `source` decoded in full as 8-bit 'L' or 'RGB' (see :func:`to_8bit`), valid
    inside the block. Any failure, a decompression bomb included, is a BadImageError naming
    `what` (the file; the caller names a shard sample)."""
    img = _decode(source, what)
    try:
        yield img
    finally:
        img.close()


def _decode(source: Path | IO[bytes], what: str) -> Image.Image:
    img: Image.Image | None = None
    try:
        # PIL raises DecompressionBombError over twice MAX_IMAGE_PIXELS but only warns between
        # one and two times it, and then allocates the image anyway: both tiers are refused.
        # (catch_warnings is process-global; every reader runs in one thread of its process.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            rawmode = _rawmode(img)  # the file's pixel layout: gone from img.tile after load()
            img.load()
            out = to_8bit(img, what, rawmode)
    except (BadImageError, MemoryError):  # MemoryError: the machine's fault, not the image's
        _close(img)
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        _close(img)
        raise BadImageError(
            f"cannot decode image {what}: {str(exc).rstrip('.')} (PIL's decompression-bomb limit,"
            f" Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); shrink the image"
        ) from None
    except Image.UnidentifiedImageError as exc:  # its text names a BytesIO by repr
        _close(img)
        raise BadImageError(f"cannot decode image {what}: not an image format PIL reads") from exc
    except Exception as exc:  # any decoder failure (OSError, SyntaxError, struct.error, ...)
        _close(img)
        raise BadImageError(f"cannot decode image {what}: {exc or type(exc).__name__}") from exc
    if out is not img:
        img.close()
    return out


def _close(img: Image.Image | None) -> None:
    if img is not None:
        img.close()


def _rawmode(img: Image.Image) -> str:
    """The raw mode PIL decodes the file's pixels from ('LA;16B' for a 16-bit grey+alpha PNG,
    which PIL opens as RGBA), or '' where the plugin does not say."""
    args = img.tile[0].args if img.tile else None
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def to_8bit(img: Image.Image, what: str, rawmode: str = "") -> Image.Image:
    """8-bit 'L' for grey sources, 'RGB' for colour ones (`img` itself when it already is).

    High bit depths keep their full range: I;16* and I by shifting right by (bits - 8), as
    libpng's 16-bit RGB does (PIL opens those as RGB by the high byte), F from 0..1. Alpha and
    palette transparency are composited over black. A palette whose colours are all grey is
    grey. Mode '1' is 0/255. CMYK and YCbCr are colour; other modes (LAB, HSV) are refused."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_grey(img, what)
    if mode == "LA":
        return Image.fromarray(np.ascontiguousarray(_over_black(np.asarray(img))[..., 0]))
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if alpha else "RGB"))
        return _grey_if_neutral(_over_black(arr) if alpha else arr)
    if mode == "RGBA":
        arr = _over_black(np.asarray(img))
        if rawmode.startswith("LA"):  # PIL opens 16-bit grey+alpha PNGs as RGBA: grey again
            return Image.fromarray(np.ascontiguousarray(arr[..., 0]))
        return Image.fromarray(arr)
    if mode in ("RGBX", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise BadImageError(
        f"cannot decode image {what}: unsupported image mode {mode!r}; save it as grey or RGB"
    )


def _over_black(arr: np.ndarray) -> np.ndarray:
    """[..., C + 1] uint8 with alpha last -> [..., C] uint8 composited over black, rounded."""
    alpha = arr[..., -1:].astype(np.uint16)
    return ((arr[..., :-1] * alpha + 127) // 255).astype(np.uint8)


def _grey_if_neutral(arr: np.ndarray) -> Image.Image:
    """'L' when every pixel of the RGB array is neutral grey (then nothing is lost), else RGB."""
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]))
    return Image.fromarray(arr)


def _scale_grey(img: Image.Image, what: str) -> Image.Image:
    """High-bit-depth grey to 'L' by the bit depth's full range; values outside it, negative
    ones or non-finite floats are an error (nothing to scale them by faithfully)."""
    arr = np.asarray(img)
    if arr.size == 0:
        raise BadImageError(f"cannot decode image {what}: empty image ({img.width}x{img.height})")
    if img.mode == "F":
        # No bit depth to go by: 0..1 is the convention for float images; anything else
        # (raw intensities, NaN) has no faithful 8-bit scale.
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise BadImageError(
                f"cannot decode image {what}: floating-point pixels in [{arr.min():g}, "
                f"{arr.max():g}], not 0..1; save it as 8- or 16-bit integers"
            )
        return Image.fromarray(np.rint(arr * 255).astype(np.uint8))
    bits, signed = _bit_depth(img, what)
    value_bits = bits - int(signed)
    ints = arr.astype(np.int64)
    lo, hi = int(ints.min()), int(ints.max())
    top = (1 << value_bits) - 1
    if lo < 0 or hi > top:
        kind = f"{bits}-bit {'signed' if signed else 'unsigned'}"
        raise BadImageError(
            f"cannot decode image {what}: pixel values {lo}..{hi} outside 0..{top}, the range of "
            f"its {kind} samples; save it as 8- or 16-bit unsigned grey"
        )
    if value_bits >= 8:
        return Image.fromarray((ints >> (value_bits - 8)).astype(np.uint8))
    return Image.fromarray(((ints * 255 + top // 2) // top).astype(np.uint8))


def _bit_depth(img: Image.Image, what: str) -> tuple[int, bool]:
    """(bits per sample, signed) of an integer grey image: TIFF's tags say (12-bit TIFFs open as
    I;16); PNG and PGM hold 16 bits (PIL scales other PGM maxvals to 16 bits)."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        fmt = tags.get(339, 1)
        return bits, int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2
    if img.mode.startswith("I;16") or img.format in ("PNG", "PPM"):
        return 16, False
    raise BadImageError(
        f"cannot decode image {what}: {img.format} image of 32-bit integers (mode I) whose bit "
        "depth is unknown; save it as 8- or 16-bit grey"
    )


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
