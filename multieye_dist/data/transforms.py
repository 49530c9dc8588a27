"""Image transforms. Evaluation as released: resize the shorter side, centre crop, ImageNet
normalisation (the training transform arrives with the streaming pipeline)."""

from __future__ import annotations

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def eval_transform(image_size: int):
    """PIL image -> normalised [3, S, S] tensor. The release resizes to S/0.875 before the crop at
    224 px and to S itself otherwise (crop_pct 1.0)."""
    from torchvision import transforms

    crop_pct = 224 / 256 if image_size == 224 else 1.0
    return transforms.Compose(
        [
            transforms.Resize(
                int(image_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
