"""Fused GPU kernels (Triton). Importing this package needs neither a GPU nor triton: the kernel
module is imported on first use, and a missing triton is an error only when the Triton
implementation is asked for (``loss.impl=triton``).

* :func:`fused_distill` - the ``"paper"`` prototype and contrastive terms from embeddings (local
  or global contrastive scope; :class:`SimulatedPeers` stands in for other ranks in one process).
* :func:`octcoda_loss_fused` - the whole OCT-CoDA student loss on top of it.
* :func:`resolve_impl` - ``loss.impl`` (auto | triton | torch) to "triton" or "torch".
"""

from multieye_dist.model.kernels.distill import (
    MAX_CONCEPTS,
    LaunchConfig,
    ProcessGroupExchange,
    SimulatedPeers,
    fused_distill,
    interpret_mode,
    triton_available,
)
from multieye_dist.model.kernels.loss import IMPLS, octcoda_loss_fused, resolve_impl

__all__ = [
    "IMPLS",
    "MAX_CONCEPTS",
    "LaunchConfig",
    "ProcessGroupExchange",
    "SimulatedPeers",
    "fused_distill",
    "interpret_mode",
    "octcoda_loss_fused",
    "resolve_impl",
    "triton_available",
]
