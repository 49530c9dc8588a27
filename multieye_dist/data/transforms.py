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


def train_transform(
    image_size: int, *, auto_augment: str = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25
):
    """The release's training augmentation through timm: random resized crop, horizontal flip,
    RandAugment, bicubic, ImageNet mean/std, then random erasing (pixel mode)."""
    from timm.data import create_transform

    return create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=None,  # the release passes None; RandAugment replaces colour jitter anyway
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
