"""Decoding shard images in the loader workers.

Two paths, chosen by ``data.augment_on``:

- ``device``: the worker only decodes, to a uint8 ``[C, H, W]`` tensor at the image's stored
  size, grey images (OCT B-scans) kept to one channel; augmentation and resizing run batched on
  the device (:mod:`multieye_dist.data.device_augment`). The decoder is PIL's (libpng,
  libjpeg-turbo): torchvision.io gives identical pixels at about the same speed
  (benchmarks/bench_loader.py measures both) but its decoders are deprecated since torchvision
  0.29, and simplejpeg was within 10% of PIL on JPEG, not worth a dependency.
- ``cpu``: PIL decode to RGB, then timm's per-image transform (the release's path).

Both read through :func:`multieye_dist.data.preprocess.open_image`, as conversion does: anything
other than 8-bit grey or RGB (palette, alpha, 16-bit, as shards of other tools may hold) is made
8-bit by the same rules, and an image over PIL's decompression-bomb limit (either tier) raises
BadImageError; the streams count and report it with its shard and key like any undecodable
sample.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multieye_dist.data.preprocess import open_image

SAMPLE = "(shard sample)"  # what a decode error names; the stream adds the shard and key


def decode_pil(data: bytes, what: str = SAMPLE) -> Image.Image:
    with open_image(io.BytesIO(data), what) as img:
        return img.convert("RGB")  # a copy: open_image closes its image


def decode_uint8(data: bytes, what: str = SAMPLE) -> torch.Tensor:
    """Encoded image -> uint8 ``[C, H, W]``, C = 1 for grey images and 3 otherwise."""
    with open_image(io.BytesIO(data), what) as img:
        x = torch.from_numpy(np.array(img))  # np.asarray would give a read-only view
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def decode_torchvision(data: bytes) -> torch.Tensor:
    """torchvision.io's decoder, for the benchmark's comparison only."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED
    )


def stack_native(images: list[torch.Tensor]) -> torch.Tensor:
    """One uint8 ``[B, C, H, W]`` batch from images at their stored sizes.

    Images of one split normally share a size (conversion pads to square and keeps or caps the
    size). When a batch mixes sizes, each is resized (bicubic, antialiased) to the largest height
    and width in the batch: the random resized crop that follows is drawn relative to the image,
    so this changes no draw, only adds one resampling to those images. A batch mixing grey and
    colour images is made colour (grey copied to three channels, as PIL's RGB conversion does).
    """
    channels = {x.shape[0] for x in images}
    if len(channels) > 1:
        images = [x.expand(3, -1, -1) for x in images]
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    return torch.stack([x if x.shape[1:] == (h, w) else _resize_uint8(x, h, w) for x in images])


def _resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = F.interpolate(x[None].float(), size=(h, w), mode="bicubic", antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)
