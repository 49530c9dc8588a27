"""The device half of ``data.augment_on=device``: loader batches (uint8 images at their stored
size, each sample's augmentation parameters drawn by the worker) become the model's normalised
input where the model runs. Batches that are already float (``augment_on=cpu``) pass through.

Nothing here reads a tensor's value on the host, so preparing a batch adds no host sync.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from multieye_dist.data.batch import Batch
from multieye_dist.data.device_augment import EvalResize, TrainAugment


class BatchPreparer:
    """``batch -> batch`` with ``image``/``partner_image`` float32 ``[B, 3, S, S]``, normalised:
    the release's training augmentation where the batch carries parameters, the evaluation
    resize and centre crop where it does not."""

    def __init__(self, image_size: int):
        self.train = TrainAugment(image_size)
        self.eval = EvalResize(image_size)

    def _image(self, x: torch.Tensor | None, aug) -> torch.Tensor | None:
        if x is None or x.dtype != torch.uint8:
            return x
        if x.shape[0] == 0:  # an empty evaluation batch (only carries a worker's counters)
            return x.new_empty(
                (0, 3, self.eval.image_size, self.eval.image_size), dtype=torch.float32
            )
        return self.train(x, aug) if aug is not None else self.eval(x)

    def __call__(self, batch: Batch) -> Batch:
        return replace(
            batch,
            image=self._image(batch.image, batch.aug),
            partner_image=self._image(batch.partner_image, batch.partner_aug),
            aug=None,
            partner_aug=None,
        )
