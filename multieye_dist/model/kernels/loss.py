"""The OCT-CoDA student loss from embeddings, with the distillation terms from the fused kernel,
and the choice between the Triton and PyTorch implementations (config ``loss.impl``)."""

from __future__ import annotations

import logging
import os

import torch

from multieye_dist.model.kernels.distill import fused_distill, interpret_mode, triton_available
from multieye_dist.model.losses import (
    LossOutput,
    octcoda_loss,
    octcoda_loss_from_terms,
    validate_logits_and_labels,
)

logger = logging.getLogger(__name__)

IMPLS: tuple[str, ...] = ("auto", "triton", "torch")


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map the config value ``loss.impl`` to the implementation to run: "triton" or "torch".

    ``auto``: Triton on CUDA (when triton is installed), PyTorch elsewhere. ``triton`` on a
    non-CUDA device is allowed only under triton's CPU interpreter (``TRITON_INTERPRET=1``,
    tests); otherwise it is an error rather than a silent fallback, since the user asked for it.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown loss.impl {impl!r}; expected one of {IMPLS}")
    device = torch.device(device)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cuda":
            logger.warning("loss.impl=auto: triton is not installed; using the PyTorch loss")
        return "torch"
    if not triton_available():
        raise ValueError("loss.impl=triton needs the 'triton' package; use loss.impl=torch")
    if device.type != "cuda" and not interpret_mode():
        raise ValueError(
            f"loss.impl=triton needs a CUDA device, got {device.type!r} (on CPU only under "
            f"triton's interpreter, TRITON_INTERPRET=1; it is now "
            f"{os.environ.get('TRITON_INTERPRET')!r}); use loss.impl=auto or torch"
        )
    return "triton"


def octcoda_loss_fused(
    student_logits: torch.Tensor,
    student_emb: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_emb: torch.Tensor,
    teacher_labels: torch.Tensor,
    concepts: torch.Tensor,
    *,
    alpha: float = 0.6,
    beta: float = 0.05,
    temperature: float = 10.0,
    contrastive_scope: str = "local",
    impl: str = "triton",
    check_labels: bool = True,
) -> LossOutput:
    """``octcoda_loss(variant="paper", contrastive_scope=...)`` from embeddings.

    ``student_emb``/``teacher_emb`` [B, 2, D] are the level-1 and level-2 embeddings (v, u),
    ``concepts`` [K, D] the bank; sims = emb @ concepts^T. ``impl`` is a resolved
    implementation (:func:`resolve_impl`): ``"triton"`` computes the distillation terms with
    :func:`fused_distill`; ``"torch"`` forms the sims and calls
    :func:`multieye_dist.model.losses.octcoda_loss`. Both share the reference's cross-entropy, gate,
    zero-gradient term when the gate is closed and dropping of a non-finite term
    (:func:`multieye_dist.model.losses.octcoda_loss_from_terms`); ``check_labels`` as there. With
    ``contrastive_scope="global"`` every rank must call this, whatever its gate decides (the
    kernel's collectives run in the forward either way).
    """
    if impl == "torch":
        sims = [
            torch.einsum("bld,kd->blk", e, concepts.to(e.dtype)) for e in (student_emb, teacher_emb)
        ]
        return octcoda_loss(
            student_logits, sims[0], student_labels, teacher_logits, sims[1], teacher_labels,
            alpha=alpha, beta=beta, temperature=temperature, variant="paper",
            contrastive_scope=contrastive_scope, check_labels=check_labels,
        )  # fmt: skip
    if impl != "triton":
        raise ValueError(f"impl must be 'triton' or 'torch' (see resolve_impl), got {impl!r}")
    num_classes = validate_logits_and_labels(
        student_logits, student_labels, teacher_logits, teacher_labels, check_labels=check_labels
    )

    def terms(
        dtype: torch.dtype, yf: torch.Tensor, yo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        # The kernel takes the embeddings' own dtype (fp32 accumulation), whatever ``dtype``.
        emb, bank = student_emb.view_as(student_emb), concepts.view_as(concepts)
        proto, con = fused_distill(
            emb, teacher_emb, bank, yf, yo, num_classes=num_classes, temperature=temperature,
            scope=contrastive_scope,
        )  # fmt: skip
        return proto, con, (emb, bank)

    return octcoda_loss_from_terms(
        student_logits, student_labels, teacher_logits, teacher_labels, terms,
        alpha=alpha, beta=beta,
    )  # fmt: skip
