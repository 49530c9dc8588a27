"""Batches moved to the GPU ahead of time: while the step runs on the current stream, the next
batch's tensors are copied from pinned memory on a side stream (``non_blocking``), so the step
never waits on a host-to-device copy. On the CPU (or when off) it passes batches through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class DevicePrefetcher:
    def __init__(self, loader: Iterable[dict], device: torch.device, enabled: bool = True):
        self.loader, self.device = loader, device
        self.enabled = enabled and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _copy(self, batch: dict, stream) -> dict:
        with torch.cuda.stream(stream):
            return {
                k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }

    def _ready(self, batch: dict, stream) -> dict:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(current)  # memory made on the side stream, used on this one
        return batch

    def __iter__(self) -> Iterator[dict]:
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
