"""The release's training augmentation (timm's ``create_transform(is_training=True,
auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel")``)
as batched ops on uint8 image tensors where the model runs, with every sample's own random draw.

Where each part happens, and why:

* **Host, loader worker** (:meth:`TrainAugment.draw`): every random number. The draw needs no
  pixels, only each image's size, and is cheap numpy on a handful of values per sample. It mirrors
  the distribution of each timm draw: RandomResizedCrop's 10 attempts and centre-crop fallback,
  the flip, RandAugment's op choice (with replacement, ``num_layers`` per image), its p=0.5 per
  layer, the magnitude ``gauss(M, std)`` clipped to [0, 10], each op's level-to-arg with its
  random sign, and RandomErasing's probability, area, log-aspect and attempts. Everything the
  device needs as an index comes from here, as a tensor in :class:`AugmentParams` (moved with
  the batch), so applying them never reads a device value back: no host sync. Taking every draw
  from the generator it is given makes a batch's augmentation a function of its seed (resume).
* **Device** (:meth:`TrainAugment.__call__`): the pixel work. Crop + bicubic resize per sample
  (the one per-sample loop: every crop has its own size), the flip as a ``where``, then each
  RandAugment layer: the batch is grouped by its drawn op (a stable sort drawn on the host:
  ``order``/``inverse`` permutations and python counts, so ``split`` sizes are python ints),
  each op runs once on its group with a per-sample argument tensor, and the samples are put
  back (the five geometric ops form one group: one affine resample, per-sample coefficients).
  Normalisation, then random erasing with noise from a generator seeded by the draw.

Each op reproduces what PIL does to a uint8 image, in float tensors holding integer values:
the geometric ops are PIL's affine transform (pixel centres, its a=-1 bicubic with clamped
borders, the fill colour outside the source, truncation to uint8), the enhance ops are PIL's
``Image.blend`` (float32, truncation), Sharpness uses PIL's SMOOTH kernel with the border kept,
Color and Contrast PIL's L conversion, and the point ops are PIL's lookup tables. The resize is
two 1-D antialiased bicubic passes rounded in between, as PIL's uint8 intermediate.

kornia is not used: its enhance ops do not follow PIL (e.g. brightness is additive, not a blend
with black) and its RandAugment draws one op sequence for the whole batch, not one per sample.

One-channel (grey) batches stay one channel through the crop and through RandAugment layers of
colour ops (on a grey image they equal their effect on its RGB copy). timm's fill colour is not
grey, so a grey batch becomes three channels before the first layer that applies a geometric op
to any of its samples, and otherwise right before normalisation: the result equals that of the
batch's RGB copy.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

log = logging.getLogger(__name__)

#: timm's ``img_mean`` hparam: the geometric ops' fill colour (ImageNet mean x 255, rounded).
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)

#: timm's ``_RAND_INCREASING_TRANSFORMS`` (inc1) and ``_RAND_TRANSFORMS`` (inc0), in its order.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})

_LEVEL_DENOM = 10.0  # timm's magnitude scale (and the default magnitude upper bound)
_TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel ops
_IDENTITY_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-m<M>-mstd<STD>-inc<0|1>[-n<N>]`` string (timm's meaning of each part)."""

    magnitude: int = 10
    magnitude_std: float = 0.0  # inf: uniform in [0, M] (timm: mstd > 100)
    increasing: bool = False
    num_layers: int = 2
    prob: float = 0.5

    _PART = re.compile(r"(m|mstd|inc|n)(\d+(?:\.\d*)?)")

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"auto_augment={text!r}: only 'rand-m<M>-mstd<STD>-inc<0|1>[-n<N>]'")
        seen: dict[str, str] = {}
        for part in parts[1:]:
            m = cls._PART.fullmatch(part)
            if m is None or m.group(1) in seen:
                raise ValueError(
                    f"auto_augment={text!r}: cannot parse {part!r} "
                    "(supported: rand-m<M>-mstd<STD>-inc<0|1>[-n<N>])"
                )
            seen[m.group(1)] = m.group(2)
        missing = [k for k in ("m", "mstd", "inc") if k not in seen]
        if missing:
            raise ValueError(f"auto_augment={text!r}: missing {', '.join(missing)}")
        try:
            mstd = float(seen["mstd"])
            spec = cls(
                magnitude=int(seen["m"]),
                magnitude_std=math.inf if mstd > 100 else mstd,
                increasing=bool(int(seen["inc"])),
                num_layers=int(seen.get("n", 2)),
            )
        except ValueError as exc:
            raise ValueError(f"auto_augment={text!r}: {exc}") from exc
        if seen.get("inc", "0") not in ("0", "1"):
            raise ValueError(f"auto_augment={text!r}: inc must be 0 or 1")
        return spec

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


# --------------------------------------------------------------------------- parameters


@dataclass
class AugmentParams:
    """Per-sample random parameters of one batch, drawn on the host by the loader worker.

    Host-side python values are used for slicing and never move; the tensors move to the device
    with the batch (:meth:`map_tensors`). ``L`` is the number of RandAugment layers, ``B`` the
    batch size; op ids index :attr:`TrainAugment.op_names`, and ``len(op_names)`` means "this
    layer is not applied to this sample".
    """

    # host side
    crops: list[tuple[int, int, int, int]]  # (top, left, h, w) in source pixels, per sample
    op_counts: list[list[int]]  # per layer: samples per op id (the last entry: not applied)
    erase_seed: int  # seeds the device generator of the erasing noise
    n_erased: int  # samples with an erased box (0: the noise is not generated)
    # tensors
    flip: torch.Tensor  # bool [B]
    ops: torch.Tensor  # int64 [L, B]: op id per sample, len(op_names) where not applied
    magnitudes: torch.Tensor  # float64 [L, B]: the drawn magnitude, clipped to [0, 10]
    args: torch.Tensor  # float64 [L, B]: timm's level-to-arg value (signed), 0 if none
    affine: torch.Tensor  # float64 [L, B, 6]: PIL AFFINE coefficients (geometric ops)
    order: torch.Tensor  # int64 [L, B]: stable sort of the samples by op group (one group per
    # colour op in op-id order, then all geometric ops together, then "not applied")
    inverse: torch.Tensor  # int64 [L, B]: its inverse permutation
    erase: torch.Tensor  # int64 [B, 4]: (top, left, h, w) of the erased box, zeros if none

    TENSORS = ("flip", "ops", "magnitudes", "args", "affine", "order", "inverse", "erase")

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AugmentParams:
        """A copy with ``fn`` applied to every tensor (pinning, device copies)."""
        return replace(self, **{name: fn(getattr(self, name)) for name in self.TENSORS})

    @property
    def batch_size(self) -> int:
        return len(self.crops)


def _level_args(name: str, mag: np.ndarray, negate: np.ndarray) -> np.ndarray:
    """timm's ``LEVEL_TO_ARG[name]`` on arrays of magnitudes (``negate``: its random sign)."""
    level = mag / _LEVEL_DENOM
    sign = np.where(negate, -1.0, 1.0)
    base = name.removesuffix("Increasing")
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros_like(mag)
    if name == "Rotate":
        return sign * (level * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (level * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (level * _TRANSLATE_PCT)
    if base == "Posterize":
        bits = np.floor(level * 4)
        return 4 - bits if name.endswith("Increasing") else bits
    if base == "Solarize":
        thresh = np.minimum(256, np.floor(level * 256))
        return 256 - thresh if name.endswith("Increasing") else thresh
    if name == "SolarizeAdd":
        return np.minimum(128, np.floor(level * 110))
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        if name.endswith("Increasing"):
            return np.maximum(0.1, 1.0 + sign * (level * 0.9))
        return level * 1.8 + 0.1
    raise ValueError(f"no level-to-arg for RandAugment op {name!r}")


def _rotate_affine(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """The AFFINE coefficients PIL's ``Image.rotate(degrees)`` uses (centre (w/2, h/2))."""
    angle = degrees % 360.0
    if angle == 0:
        return _IDENTITY_AFFINE
    cx, cy = w / 2, h / 2
    rad = -math.radians(angle)
    a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
    d, e = round(-math.sin(rad), 15), round(math.cos(rad), 15)
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    return (a, b, c, d, e, f)


def affine_coeffs(name: str, arg: float, size: int) -> tuple[float, ...]:
    """PIL AFFINE data (output pixel centre -> source) of timm's geometric op on a square image."""
    if name == "Rotate":
        return _rotate_affine(arg, size, size)
    if name == "ShearX":
        return (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, arg * size, 0.0, 1.0, 0.0)
    if name == "TranslateYRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg * size)
    return _IDENTITY_AFFINE


def _first_valid(ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether any attempt succeeded and the index of the first that did."""
    return ok.any(axis=1), ok.argmax(axis=1)


# --------------------------------------------------------------------------- device ops
# Every op: (x float32 [n, C, S, S] holding integers in [0, 255], arg float64 [n],
# affine float64 [n, 6], fill float32 [C]) -> the same, as PIL would compute on uint8.


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """PIL's fixed-point resampling output: round half up, clip to [0, 255]."""
    return x.add(0.5).floor_().clamp_(0, 255)


def _trunc_u8(x: torch.Tensor) -> torch.Tensor:
    """PIL's float -> UINT8 (``v <= 0: 0; v >= 255: 255; else (UINT8)v``)."""
    return x.floor().clamp_(0, 255)


def resize_bicubic(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """PIL's ``Image.resize((out_w, out_h), BICUBIC)`` on float [n, C, h, w] integer values: the
    horizontal pass, rounded to uint8, then the vertical pass (PIL's order), each skipped when
    that side keeps its size. Antialiased bicubic is PIL's a=-0.5 filter, widened on reduction."""
    if x.shape[3] != out_w:
        size = (x.shape[2], out_w)
        x = _round_u8(F.interpolate(x, size=size, mode="bicubic", antialias=True))
    if x.shape[2] != out_h:
        x = _round_u8(F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True))
    return x


def _cubic(
    v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """PIL Geometry.c's BICUBIC macro (a = -1), in its evaluation order."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _affine_bicubic(x: torch.Tensor, coeffs: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, coeffs, BICUBIC, fillcolor=fill)``, batched with
    per-sample coefficients: source = A @ (x + 0.5, y + 0.5, 1); a source outside the image
    gives the fill colour, inside the 4x4 neighbourhood is clamped to the border. One gather
    fetches all 16 taps; the arithmetic is PIL's, in float64, so the result is PIL's."""
    n, c, h, w = x.shape
    f64, hw = torch.float64, h * w
    px = (torch.arange(w, device=x.device, dtype=f64) + 0.5).view(1, 1, w)
    py = (torch.arange(h, device=x.device, dtype=f64) + 0.5).view(1, h, 1)
    a = coeffs.to(f64).view(n, 6, 1, 1)
    xin = a[:, 0] * px + a[:, 1] * py + a[:, 2]  # [n, h, w]
    yin = a[:, 3] * px + a[:, 4] * py + a[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = (xs - x0).view(n, 1, 1, hw), (ys - y0).view(n, 1, hw)
    taps = torch.arange(-1, 3, device=x.device).view(1, 4, 1)
    # clamped to keep far-off (outside, filled) sources' indices small, then to the border
    cols = (x0.clamp(-3, w + 1).long().view(n, 1, hw) + taps).clamp_(0, w - 1)  # [n, 4, hw]
    rows = (y0.clamp(-3, h + 1).long().view(n, 1, hw) + taps).clamp_(0, h - 1)
    idx = (cols.unsqueeze(2) + rows.unsqueeze(1) * w).view(n, 1, 16 * hw)  # (col, row, pixel)
    v = x.to(f64).reshape(n, c, hw).gather(2, idx.expand(n, c, 16 * hw)).view(n, c, 4, 4, hw)
    across = _cubic(v[:, :, 0], v[:, :, 1], v[:, :, 2], v[:, :, 3], dx)  # [n, c, 4 rows, hw]
    out = _cubic(across[:, :, 0], across[:, :, 1], across[:, :, 2], across[:, :, 3], dy)
    out = _trunc_u8(out).to(x.dtype).view(n, c, h, w)
    return torch.where(inside.view(n, 1, h, w), out, fill.view(1, c, 1, 1))


def _geometric(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    return _affine_bicubic(x, affine, fill)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel lookup: x [n, C, H, W] integer values, lut [n, C, 256]."""
    n, c, h, w = x.shape
    idx = x.to(torch.int64).view(n, c, h * w)
    return lut.to(x.dtype).gather(2, idx).view(n, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """int64 [n, C, 256] per-channel histograms (scatter_add: no host sync, unlike bincount)."""
    n, c, h, w = x.shape
    idx = x.to(torch.int64).view(n, c, h * w)
    hist = torch.zeros(n, c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(2, idx, torch.ones_like(idx))


def _equalize(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """PIL ``ImageOps.equalize``: lut[i] = (step // 2 + sum(h[:i])) // step, step = (total -
    count of the last used level) // 255; the identity with <= 1 used level or step 0."""
    hist = _histogram(x)
    levels = torch.arange(256, device=x.device)
    used = hist > 0
    last = torch.where(used, levels, -1).amax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last.clamp(min=0))).div(
        255, rounding_mode="floor"
    )
    below = hist.cumsum(2) - hist
    lut = (step.div(2, rounding_mode="floor") + below).div(step.clamp(min=1), rounding_mode="floor")
    keep = (used.sum(2, keepdim=True) <= 1) | (step == 0)
    return _apply_lut(x, torch.where(keep, levels, lut.clamp(max=255)))


def _autocontrast(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): per channel lut[i] = int(i * scale + offset),
    scale = 255 / (hi - lo), offset = -lo * scale, in float64 as PIL's python does."""
    lo = x.amin((2, 3)).to(torch.float64).unsqueeze(2)
    hi = x.amax((2, 3)).to(torch.float64).unsqueeze(2)
    # tensor / tensor: torch computes ``scalar / tensor`` as ``reciprocal(tensor) * scalar``
    scale = torch.full_like(hi, 255.0).div_((hi - lo).clamp(min=1))
    offset = -lo * scale
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = (levels * scale + offset).trunc().clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, levels))


def _invert(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    return 255 - x


def _posterize(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """PIL ``ImageOps.posterize(bits)``: keep the top ``bits`` bits (timm: bits >= 8 no-op)."""
    shift = (8 - arg).clamp(0, 8).to(torch.int32).view(-1, 1, 1, 1)
    xi = x.to(torch.int32)
    return torch.bitwise_left_shift(torch.bitwise_right_shift(xi, shift), shift).to(x.dtype)


def _solarize(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    thresh = arg.to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x < thresh, x, 255 - x)


def _solarize_add(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    add = arg.to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x < 128, (x + add).clamp(max=255), x)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, image, factor)`` on uint8: float32 ``in1 + a * (in2 - in1)``,
    truncated and clipped (the ``ImageEnhance`` classes all enhance this way)."""
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    return _trunc_u8(degenerate + alpha * (image - degenerate))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, exact in int32."""
    xi = x.to(torch.int32)
    if x.shape[1] == 1:
        return xi
    r, g, b = xi[:, 0:1], xi[:, 1:2], xi[:, 2:3]
    return torch.bitwise_right_shift(r * 19595 + g * 38470 + b * 7471 + 0x8000, 16)


def _color(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    if x.shape[1] == 1:  # L -> L is the image itself: blending with it changes nothing
        return x
    return _blend(_grey(x).to(x.dtype), x, arg)


def _contrast(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """Blend with the constant ``int(mean(L) + 0.5)`` (integer arithmetic: exact)."""
    n_px = x.shape[2] * x.shape[3]
    total = _grey(x).sum((1, 2, 3), dtype=torch.int64)
    mean = (2 * total + n_px).div(2 * n_px, rounding_mode="floor")
    return _blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, arg)


_K1 = float(np.float32(1) / np.float32(13))  # ImageFilter.SMOOTH: (1 1 1 / 1 5 1 / 1 1 1) / 13
_K5 = float(np.float32(5) / np.float32(13))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``filter(ImageFilter.SMOOTH)``: float32 sums in Filter.c's order plus 0.5,
    truncated; the one-pixel border is copied unchanged."""

    def row(r: torch.Tensor, centre: float) -> torch.Tensor:
        return r[..., :-2] * _K1 + r[..., 1:-1] * centre + r[..., 2:] * _K1

    ss = row(x[:, :, 2:], _K1) + 0.5
    ss = ss + row(x[:, :, 1:-1], _K5)
    ss = ss + row(x[:, :, :-2], _K1)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _trunc_u8(ss)
    return out


def _sharpness(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    return _blend(_smooth(x), x, arg)


def _brightness(
    x: torch.Tensor, arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    return _blend(torch.zeros_like(x[:, :1, :1, :1]), x, arg)


_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    **{name: _geometric for name in GEOMETRIC_OPS},
}


def _device_op(name: str) -> Callable[..., torch.Tensor]:
    return _OPS[name.removesuffix("Increasing")]


def _op_groups(
    op_names: Sequence[str],
) -> tuple[list[tuple[Callable[..., torch.Tensor] | None, list[int]]], np.ndarray]:
    """How a layer's samples are grouped: one group per colour op, one for all the geometric ops
    (one affine resample with per-sample coefficients), then "not applied" (``None``). Returns
    the groups (device function, op ids) and each op id's sort key (``len(op_names)``: none)."""
    colour = [k for k, n in enumerate(op_names) if n not in GEOMETRIC_OPS]
    geometric = [k for k, n in enumerate(op_names) if n in GEOMETRIC_OPS]
    groups: list = [(_device_op(op_names[k]), [k]) for k in colour]
    if geometric:
        groups.append((_geometric, geometric))
    groups.append((None, [len(op_names)]))
    key = np.empty(len(op_names) + 1, dtype=np.int64)
    for g, (_, ids) in enumerate(groups):
        key[ids] = g
    return groups, key


# --------------------------------------------------------------------------- constants


class _Constants:
    """Per-device constant tensors, made with fill kernels (no host-to-device copy) once."""

    def __init__(self) -> None:
        self._cache: dict[tuple[torch.device, str], torch.Tensor] = {}

    def get(self, key: str, values: Sequence[float], device: torch.device) -> torch.Tensor:
        t = self._cache.get((device, key))
        if t is None:
            parts = [torch.full((), v, dtype=torch.float32, device=device) for v in values]
            t = self._cache[(device, key)] = torch.stack(parts)
        return t


def _normalise(x: torch.Tensor, consts: _Constants) -> torch.Tensor:
    """torchvision ``ToTensor`` + ``Normalize(ImageNet)`` on integer-valued float [n, C, S, S];
    grey becomes RGB (its three identical channels) here."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = consts.get("mean", IMAGENET_DEFAULT_MEAN, x.device).view(1, 3, 1, 1)
    std = consts.get("std", IMAGENET_DEFAULT_STD, x.device).view(1, 3, 1, 1)
    # a tensor divisor: CUDA divides by a python scalar as a multiply by its reciprocal
    return x.div(consts.get("255", (255.0,), x.device)).sub_(mean).div_(std)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected [B, 1 or 3, H, W], got {tuple(images.shape)}")


# --------------------------------------------------------------------------- the transforms


class TrainAugment:
    """timm's training transform for ``image_size`` S, split into a host draw and a device
    apply: ``aug(images, aug.draw(rng, sizes))``."""

    def __init__(
        self, image_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25
    ):
        if image_size < 3:
            raise ValueError(f"image_size={image_size}: too small")
        if not 0.0 <= re_prob <= 1.0:
            raise ValueError(f"re_prob={re_prob}: not a probability")
        self.image_size = image_size
        self.spec = RandAugmentSpec.parse(auto_augment)
        self.op_names = self.spec.op_names
        self.re_prob = re_prob
        # timm's transforms_imagenet_train / RandomErasing defaults for the release's call
        self.scale = (0.08, 1.0)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.hflip = 0.5
        self.re_area = (0.02, 1.0 / 3.0)
        self.re_log_aspect = (math.log(0.3), math.log(1.0 / 0.3))
        self._geometric_ids = [i for i, n in enumerate(self.op_names) if n in GEOMETRIC_OPS]
        self._groups, self._group_key = _op_groups(self.op_names)
        self._consts = _Constants()
        log.debug("TrainAugment(S=%d, %s, re_prob=%s)", image_size, self.spec, re_prob)

    # ----------------------------------------------------------------- host: draw

    def draw(self, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> AugmentParams:
        """Host side, cheap, no pixels needed: sizes are each source image's (height, width)."""
        b = len(sizes)
        crops = self._draw_crops(rng, sizes)
        flip = rng.random(b) < self.hflip
        ops, mags, args, affine = self._draw_rand_augment(rng, b)
        erase = self._draw_erasing(rng, b)
        erase_seed = int(rng.integers(0, 2**63 - 1))
        n_ops = len(self.op_names)
        order = np.argsort(self._group_key[ops], axis=1, kind="stable")
        inverse = np.argsort(order, axis=1)
        counts = [np.bincount(o, minlength=n_ops + 1).tolist() for o in ops]
        return AugmentParams(
            crops=crops,
            op_counts=counts,
            erase_seed=erase_seed,
            n_erased=int((erase[:, 2] > 0).sum()),
            flip=torch.from_numpy(flip),
            ops=torch.from_numpy(ops),
            magnitudes=torch.from_numpy(mags),
            args=torch.from_numpy(args),
            affine=torch.from_numpy(affine),
            order=torch.from_numpy(order),
            inverse=torch.from_numpy(inverse),
            erase=torch.from_numpy(erase),
        )

    def _draw_crops(
        self, rng: np.random.Generator, sizes: list[tuple[int, int]]
    ) -> list[tuple[int, int, int, int]]:
        """``RandomResizedCropAndInterpolation.get_params`` for every sample at once."""
        hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        h, w = hw[:, 0:1], hw[:, 1:2]
        area = (h * w).astype(np.float64)
        target = rng.uniform(*self.scale, size=(len(hw), 10)) * area
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = np.exp(rng.uniform(*log_ratio, size=(len(hw), 10)))
        tw = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: python round's ties
        th = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        found, first = _first_valid((tw <= w) & (th <= h))
        pick = np.arange(len(hw))
        th, tw = th[pick, first], tw[pick, first]
        top = rng.integers(0, np.where(found, h[:, 0] - th, 0) + 1)
        left = rng.integers(0, np.where(found, w[:, 0] - tw, 0) + 1)
        crops = []
        for i, (hi, wi) in enumerate(hw.tolist()):
            if found[i]:
                crops.append((int(top[i]), int(left[i]), int(th[i]), int(tw[i])))
            else:
                crops.append(self._centre_crop(hi, wi))
        return crops

    def _centre_crop(self, h: int, w: int) -> tuple[int, int, int, int]:
        """timm's fallback after 10 failed attempts."""
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            tw, th = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            th, tw = h, int(round(h * max(self.ratio)))
        else:
            tw, th = w, h
        return ((h - th) // 2, (w - tw) // 2, th, tw)

    def _draw_rand_augment(
        self, rng: np.random.Generator, b: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """RandAugment: ops (with replacement), p per layer, magnitude, level-to-arg, sign."""
        spec, n_ops = self.spec, len(self.op_names)
        shape = (spec.num_layers, b)
        choice = rng.integers(0, n_ops, size=shape)
        applied = ~(rng.random(shape) > spec.prob)  # timm: skip if random() > prob
        if spec.magnitude_std == math.inf:
            mags = rng.uniform(0.0, spec.magnitude, size=shape)
        elif spec.magnitude_std > 0:
            mags = rng.normal(spec.magnitude, spec.magnitude_std, size=shape)
        else:
            mags = np.full(shape, float(spec.magnitude))
        mags = np.clip(mags, 0.0, _LEVEL_DENOM)
        negate = rng.random(shape) > 0.5  # timm's _randomly_negate
        args = np.zeros(shape)
        affine = np.tile(np.asarray(_IDENTITY_AFFINE), (*shape, 1))
        for k, name in enumerate(self.op_names):
            sel = choice == k
            args[sel] = _level_args(name, mags[sel], negate[sel])
            if name in GEOMETRIC_OPS:
                for layer, i in zip(*np.nonzero(sel & applied), strict=True):
                    affine[layer, i] = affine_coeffs(name, float(args[layer, i]), self.image_size)
        ops = np.where(applied, choice, n_ops).astype(np.int64)
        return ops, mags, args, affine

    def _draw_erasing(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """timm's RandomErasing (count 1) on the S x S normalised image: int64 [b, 4] boxes."""
        s = self.image_size
        erase = ~(rng.random(b) > self.re_prob)
        target = rng.uniform(*self.re_area, size=(b, 10)) * (s * s)
        aspect = np.exp(rng.uniform(*self.re_log_aspect, size=(b, 10)))
        h = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        found, first = _first_valid((w < s) & (h < s))
        pick = np.arange(b)
        h, w = h[pick, first], w[pick, first]
        ok = erase & found
        top = rng.integers(0, np.where(ok, s - h, 0) + 1)
        left = rng.integers(0, np.where(ok, s - w, 0) + 1)
        boxes = np.stack([top, left, h, w], axis=1).astype(np.int64)
        boxes[~ok] = 0
        return boxes

    # ----------------------------------------------------------------- device: apply

    def __call__(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """images: uint8 [B, C, H, W] (C = 1 or 3; all the same H, W) on any device ->
        float32 [B, 3, S, S], normalised, on the same device."""
        _check_images(images)
        if images.shape[0] != params.batch_size:
            raise ValueError(f"{images.shape[0]} images, parameters for {params.batch_size}")
        if params.order.device != images.device:
            raise ValueError(
                f"parameters on {params.order.device}, images on {images.device}: move them "
                "with params.map_tensors"
            )
        x = self.crop_flip(images, params)
        x = self.rand_augment(x, params)
        return self.finish(x, params)

    def crop_flip(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Each sample's crop resized to S x S (PIL bicubic), then the flip: integer-valued
        float32 [B, C, S, S]. Crops index the image from its top-left corner."""
        s = self.image_size
        src = images.to(torch.float32)
        out = src.new_empty((src.shape[0], src.shape[1], s, s))
        for i, (top, left, h, w) in enumerate(params.crops):
            out[i] = resize_bicubic(src[i : i + 1, :, top : top + h, left : left + w], s, s)[0]
        return torch.where(params.flip.view(-1, 1, 1, 1), out.flip(3), out)

    def rand_augment(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The RandAugment layers on integer-valued float [B, C, S, S], grouped by op."""
        n_ops = len(self.op_names)
        for layer, counts in enumerate(params.op_counts):
            if counts[n_ops] == x.shape[0]:  # no sample applies this layer
                continue
            if x.shape[1] == 1 and any(counts[k] for k in self._geometric_ids):
                x = x.expand(-1, 3, -1, -1)  # the fill colour is not grey
            x = self._layer(x, params, layer, counts)
        return x

    def _layer(
        self, x: torch.Tensor, params: AugmentParams, layer: int, counts: list[int]
    ) -> torch.Tensor:
        order, inverse = params.order[layer], params.inverse[layer]
        sizes = [sum(counts[k] for k in ids) for _, ids in self._groups]
        groups = zip(
            self._groups,
            x.index_select(0, order).split(sizes),
            params.args[layer].index_select(0, order).split(sizes),
            params.affine[layer].index_select(0, order).split(sizes),
            strict=True,
        )
        fill = self._consts.get("fill", FILL, x.device)[: x.shape[1]]
        out = [
            g if fn is None or g.shape[0] == 0 else fn(g, a, m, fill) for (fn, _), g, a, m in groups
        ]
        return torch.cat(out).index_select(0, inverse)

    def finish(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Normalise, then random erasing with per-pixel standard normal noise (timm's order)."""
        x = _normalise(x, self._consts)
        if not params.n_erased:
            return x
        n, _, h, w = x.shape
        top, left, bh, bw = params.erase.unbind(1)
        ys = torch.arange(h, device=x.device).view(1, h)
        xs = torch.arange(w, device=x.device).view(1, w)
        rows = (ys >= top.view(n, 1)) & (ys < (top + bh).view(n, 1))
        cols = (xs >= left.view(n, 1)) & (xs < (left + bw).view(n, 1))
        mask = rows.view(n, 1, h, 1) & cols.view(n, 1, 1, w)
        gen = torch.Generator(device=x.device)
        gen.manual_seed(params.erase_seed)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return torch.where(mask, noise, x)


class EvalResize:
    """``transforms.eval_transform`` on batches: the shorter side to S / crop_pct (bicubic,
    crop_pct = 224/256 at S = 224, else 1), centre crop S x S, ImageNet normalisation."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        crop_pct = 224 / 256 if image_size == 224 else 1.0
        self.resize_to = int(image_size / crop_pct)
        self._consts = _Constants()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 [B, 3, S, S] normalised: what transforms.eval_transform
        does (shorter side to S / crop_pct bicubic, crop_pct = 224/256 at S=224 else 1, centre
        crop, normalise)."""
        _check_images(images)
        _, _, h, w = images.shape
        s, short = self.image_size, self.resize_to
        # torchvision's _compute_resized_output_size for an int size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_h, new_w = short, int(short * w / h)
        if new_h < s or new_w < s:
            raise ValueError(f"image {h}x{w} resized to {new_h}x{new_w} is smaller than {s}")
        x = resize_bicubic(images.to(torch.float32), new_h, new_w)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        return _normalise(x[:, :, top : top + s, left : left + s], self._consts)
