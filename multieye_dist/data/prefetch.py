"""Batches moved to the GPU ahead of time: while the step runs on the current stream, the next
batch's tensors are copied from pinned memory on a side stream (``non_blocking``), so the step
never waits on a host-to-device copy. On the CPU (or when off) it passes batches through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from multieye_dist.data.batch import Batch


class DevicePrefetcher:
    def __init__(self, loader: Iterable[Batch], device: torch.device, enabled: bool = True):
        self.loader, self.device = loader, device
        self.enabled = enabled and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _copy(self, batch: Batch, stream) -> Batch:
        with torch.cuda.stream(stream):
            return batch.to(self.device, non_blocking=True)

    def _ready(self, batch: Batch, stream) -> Batch:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)

        def keep(t: torch.Tensor) -> torch.Tensor:
            t.record_stream(current)  # memory made on the side stream, used on this one
            return t

        return batch.map_tensors(keep)

    def __iter__(self) -> Iterator[Batch]:
        if not self.enabled:
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        it = iter(self.loader)
        try:
            pending = self._copy(next(it), stream)
        except StopIteration:
            return
        for batch in it:
            ready = self._ready(pending, stream)
            pending = self._copy(batch, stream)  # overlaps with the step on `ready`
            yield ready
        yield self._ready(pending, stream)
