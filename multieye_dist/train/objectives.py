"""Training objectives: everything a stage's loss decides, in one object per (stage, loss).

An :class:`Objective` says which modality its stage trains and evaluates, whether it reads a
partner stream and needs the frozen teacher, which parameters it trains, which implementation
computes it (PyTorch, or the fused Triton kernel), and computes the step's loss::

    total, terms = objective(model, teacher, batch)   # terms: {"cls": ..., ...}, on the device

The trainer (:mod:`multieye_dist.train.loop`) knows none of this: it builds the objective from the
config, reads its attributes to set up the streams and the teacher, and logs whatever terms the
objective returns (as ``train/<name>``). A new loss is one class here, registered with
:func:`register` under its stage and its ``loss.name``; nothing else changes. A stage with one
objective (the teacher's) uses it whatever ``loss.name`` says; a stage with several picks by
``loss.name``. The names and variants a config may choose are
:data:`multieye_dist.config.OBJECTIVE_CHOICES`, which :func:`register` fills.

Nothing here reads a tensor back to the host: the gate and the finite checks stay on the device
(see :mod:`multieye_dist.model.losses`), and labels were range-checked where the shard reader parsed
them (:mod:`multieye_dist.data.schema`), so the losses are called with ``check_labels=False``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multieye_dist.config import LossConfig, objective_name, register_objective
from multieye_dist.core.resources import user_path
from multieye_dist.data.batch import Batch
from multieye_dist.data.synth import FINDING_PROBS
from multieye_dist.model.concept_model import param_dtype
from multieye_dist.model.concepts import concept_findings, load_bank
from multieye_dist.model.losses import LossOutput, fundus_only_loss, octcoda_loss
from multieye_dist.model.oracle import OracleTeacher

if TYPE_CHECKING:
    from multieye_dist.config import Config
    from multieye_dist.model.concept_model import ConceptModel, FrozenTeacher

logger = logging.getLogger(__name__)

Terms = dict[str, torch.Tensor]


class Objective:
    """The loss of one training stage; subclasses set the class attributes and ``__call__``."""

    name: ClassVar[str]  # its loss.name
    stage: ClassVar[str]  # its train.stage
    modality: ClassVar[str] = "fundus"  # what the stage reads as primary and evaluates
    partner: ClassVar[str | None] = None  # the modality of each sample's partner, if any
    needs_teacher: ClassVar[bool] = False
    # The loss.variant values this objective computes differently; () = it has none, and
    # loss.variant does not change it.
    variants: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.impl = "torch"  # or "triton": the fused kernel (OctCoda)
        fmt = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format
        self.memory_format = fmt
        # partner_classes[c]: the OCT class the stream pairs fundus class c with (None: c).
        self.partner_classes: tuple[int, ...] | None = None
        self.step = 0  # optimizer steps so far (set by the trainer): for ramps

    def set_step(self, step: int) -> None:
        self.step = step

    @property
    def trains_level2(self) -> bool:
        """Whether a term reaches W_4 (the level-2 projection)."""
        return False

    def freeze_unreached(self, model: ConceptModel) -> None:
        """Parameters no term reaches leave the optimizer: ZeRO would otherwise reduce
        gradients that never exist."""
        for p in model.level2.parameters():
            p.requires_grad_(self.trains_level2)

    def inputs(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Images in the layout the step runs in (NHWC when perf.channels_last) and ``dtype``."""
        return x.to(self.device, dtype=dtype, memory_format=self.memory_format, non_blocking=True)

    def __call__(
        self, model: nn.Module, teacher: FrozenTeacher | None, batch: Batch
    ) -> tuple[torch.Tensor, Terms]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.stage}/{self.name} ({self.impl})"


OBJECTIVES: dict[str, dict[str, type[Objective]]] = {}  # stage -> loss.name -> class


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable by its ``stage`` and ``name`` (and a config
    choice: :func:`multieye_dist.config.register_objective`)."""
    register_objective(cls.stage, cls.name, cls.variants)
    OBJECTIVES.setdefault(cls.stage, {})[cls.name] = cls
    return cls


def objective_class(stage: str, loss: LossConfig) -> type[Objective]:
    """The objective for ``train.stage`` and the ``loss`` section (ConfigError, a ValueError,
    naming the option and its choices when there is none: :func:`objective_name`)."""
    return OBJECTIVES[stage][objective_name(stage, loss)]


def build_objective(cfg: Config, device: torch.device) -> Objective:
    objective = objective_class(cfg.train.stage, cfg.loss)(cfg, device)
    logger.info("objective %s", objective.describe())
    return objective


def _module(model: nn.Module) -> nn.Module:
    """The model itself under a wrapper (DeepSpeed's engine, DDP) that keeps it as .module."""
    return getattr(model, "module", model)


def _distill_terms(out: LossOutput) -> Terms:
    return {
        "cls": out.cls,
        "prototype": out.prototype,
        "contrastive": out.contrastive,
        "gate_open": out.gated.float(),
    }


# ----------------------------------------------------------------------------- objectives


@register
class TeacherCE(Objective):
    """Stage 1: cross-entropy of the OCT teacher. With ``teacher.train_level2`` the level-2
    similarities s' are also read through the classifier (its weights detached, so only W_4
    learns from this term): the classifier never reads s', so without it W_4 would get no
    gradient at all."""

    name = "teacher-ce"
    stage = "teacher"
    modality = "oct"

    @property
    def trains_level2(self) -> bool:
        return self.cfg.teacher.train_level2

    def __call__(self, model, teacher, batch):
        logits, sims = model(self.inputs(batch.image, param_dtype(model)))
        terms = {"cls": F.cross_entropy(logits.float(), batch.label)}
        if self.trains_level2:
            classifier = _module(model).classifier
            w, b = classifier.weight.detach().float(), classifier.bias.detach().float()
            terms["level2"] = F.cross_entropy(F.linear(sims[:, 1].float(), w, b), batch.label)
        return sum(terms.values()), terms


@register
class FundusOnly(Objective):
    """The fundus-only baseline: cross-entropy on fundus, no partner, no teacher (decoding
    partners it would not use would cost half the loader)."""

    name = "fundus-only"
    stage = "distill"

    def __call__(self, model, teacher, batch):
        logits, _ = model(self.inputs(batch.image, param_dtype(model)))
        out = fundus_only_loss(logits, batch.label, check_labels=False)
        return out.total, {"cls": out.cls}


@register
class OctCoda(Objective):
    """OCT-CoDA (docs/method.md): fundus student, label-matched OCT partners through the frozen
    teacher, ``cls + gate * (beta * prototype + alpha * contrastive)``. ``loss.impl`` picks the
    fused Triton kernel (from embeddings; the paper variant, local or global scope) or PyTorch."""

    name = "octcoda"
    stage = "distill"
    partner = "oct"
    needs_teacher = True
    variants = ("paper", "official")

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.impl = resolve_loss_impl(cfg.loss, device)
        self.oracle: OracleTeacher | None = None
        if cfg.teacher.kind != "model":  # a control that reads the partners' findings
            self.needs_teacher = False  # no model to load (an instance attribute, as modality)
            self.impl = "torch"  # it gives similarities, which the fused kernel does not take
            mapping = bank_concept_findings(cfg.concepts.bank, FINDING_PROBS.shape[1])
            if mapping is None:
                raise ValueError(
                    f"teacher.kind={cfg.teacher.kind}: concepts.bank={cfg.concepts.bank} does not "
                    "say which finding each concept describes (one row per finding, or its "
                    "'concept_findings' metadata); use a findings bank, e.g. "
                    "configs/concepts/synth-findings-minilm.safetensors"
                )
            self.oracle = OracleTeacher(
                cfg.teacher.kind,
                mapping,
                cfg.model.num_classes,
                cfg.train.seed,
                device,
            )
        if cfg.loss.control == "permuted-teacher" or cfg.teacher.kind == "oracle-permuted":
            n = cfg.model.num_classes  # the training data's (train.data_classes)
            self.partner_classes = derangement(n, cfg.train.seed)
            inverse = [0] * n
            for c, p in enumerate(self.partner_classes):
                inverse[p] = c
            self._perm = torch.tensor(self.partner_classes, device=device)
            self._inverse = torch.tensor(inverse, device=device)

    @property
    def trains_level2(self) -> bool:
        return True

    def ramp(self) -> float:
        """The share of alpha and beta in force at this step (loss.distill_warmup_steps)."""
        n = self.cfg.loss.distill_warmup_steps
        return 1.0 if n == 0 else min(1.0, self.step / n)

    def _teacher(self, teacher, batch, partner, labels, embeddings: bool):
        """The teacher's (logits, sims or embeddings) and the partners' labels; under the
        permuted controls, relabelled as the fundus class each partner stands in for. An oracle
        answers from the partners' shard records instead of their images."""
        if self.oracle is not None:
            zo, out = self.oracle(batch.partner_meta, labels, batch.partner_keys)
        else:
            zo, out = teacher.embeddings(partner) if embeddings else teacher(partner)
        if self.partner_classes is not None:  # OCT of class perm[c] speaks for class c
            zo, labels = zo[:, self._perm], self._inverse[labels]
        return zo, out, labels

    def __call__(self, model, teacher, batch):
        c = self.cfg.loss
        ramp = self.ramp()
        x = self.inputs(batch.image, param_dtype(model))
        partner = self.inputs(batch.partner_image)
        fused = self.impl == "triton"
        zo, to, yo = self._teacher(teacher, batch, partner, batch.partner_label, fused)
        if fused:
            from multieye_dist.model.kernels import octcoda_loss_fused

            logits, emb = model(x, return_embeddings=True)
            out = octcoda_loss_fused(
                logits, emb, batch.label, zo, to, yo, _module(model).concepts,
                alpha=c.alpha * ramp, beta=c.beta * ramp, temperature=c.temperature,
                contrastive_scope=c.contrastive_scope, impl="triton", check_labels=False,
            )  # fmt: skip
        else:
            logits, sims = model(x)
            out = octcoda_loss(
                logits, sims, batch.label, zo, to, yo,
                alpha=c.alpha * ramp, beta=c.beta * ramp, temperature=c.temperature,
                variant=c.variant, contrastive_scope=c.contrastive_scope, check_labels=False,
            )  # fmt: skip
        terms = _distill_terms(out)
        # Diagnostic (not in the total): the scale of the student's level-2 similarities, which
        # distillation alone drives (docs/training.md, "Keeping distillation in scale").
        s2 = (to_sims(emb, _module(model).concepts) if fused else sims)[:, 1].detach().float()
        terms["level2_rms"] = s2.pow(2).mean().sqrt()
        if c.control == "gate-never":
            # Same graph and terms, nothing of distillation in the total (its gradient is 0).
            terms["gate_open"] = torch.zeros_like(terms["gate_open"])
            return out.cls + (out.total - out.cls) * 0.0, terms
        if c.control == "gate-open":  # the released rule's decision overruled at every step
            distill = ramp * (c.beta * out.prototype + c.alpha * out.contrastive)
            used = torch.where(distill.isfinite(), distill, torch.zeros_like(distill))
            terms["gate_open"] = torch.ones_like(terms["gate_open"])
            return out.cls + used.to(out.cls.dtype), terms
        return out.total, terms


def bank_concept_findings(bank: str, num_findings: int | None) -> list[int] | None:
    """The finding each row of the bank ``concepts.bank`` describes (None: not known)."""
    path = user_path(bank)
    concepts, _, meta = load_bank(path)
    return concept_findings(meta, concepts.shape[0], num_findings, str(path))


def to_sims(emb: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Similarities [B, 2, K] from the embeddings [B, 2, D] that the fused path works on."""
    return emb @ concepts.to(emb.dtype).t()


def derangement(n: int, seed: int) -> tuple[int, ...]:
    """A permutation of range(n) with no fixed point, drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0xD1E])
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return tuple(int(p) for p in perm)


@register
class ConceptAlign(Objective):
    """Stage 0, concept alignment (``align``, :class:`multieye_dist.config.AlignConfig`):
    image-text contrastive training of the backbone and W_p against the concept bank, as
    CLIP/FLAIR align images with captions, for one modality. The captions are the bank's
    sentences and an image's positives are all the concepts in its shard record's ``findings``
    (multi-positive): image -> concepts, a softmax over the K concepts with the positives
    sharing the target; concepts -> images, a softmax over the batch for each concept present.
    An image with no finding (a normal eye) is a negative for every concept. The logits are the
    level-1 similarities s (cosines) over ``align.temperature``. With ``align.probe`` the
    classifier also learns from the detached s (``probe``), so dev macro-F1 scores the concept
    space without shaping it."""

    name = "concept-align"
    stage = "align"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.modality = cfg.align.modality  # an instance attribute: one objective, two modalities
        # A bank with several concepts per finding (its concept_findings metadata): an image is
        # positive with all of its findings' concepts. Without it, a finding index is a row.
        self._rows_of = bank_concept_findings(cfg.concepts.bank, None)

    def freeze_unreached(self, model: ConceptModel) -> None:
        super().freeze_unreached(model)
        for p in model.classifier.parameters():
            p.requires_grad_(self.cfg.align.probe)

    def positives(self, batch: Batch, k: int) -> torch.Tensor:
        """[B, K] float multi-hot of each sample's findings (host-built: the records are)."""
        target = torch.zeros(len(batch), k)
        for i, (key, meta) in enumerate(zip(batch.keys, batch.meta, strict=True)):
            findings = meta.get("findings")
            if findings is None:
                raise ValueError(
                    f"train.stage=align: sample {key} has no 'findings' in its shard record; "
                    "alignment needs per-image findings (the synthetic data has them; for real "
                    "data start from FLAIR: multieye-dist import flair)"
                )
            if self._rows_of is not None:  # the concepts that describe one of its findings
                findings = [r for r, f in enumerate(self._rows_of) if f in findings]
            bad = [f for f in findings if not 0 <= f < k]
            if bad:
                raise ValueError(
                    f"train.stage=align: sample {key} has findings {bad} outside the concept "
                    f"bank's K={k} rows (concepts.bank={self.cfg.concepts.bank})"
                )
            target[i, findings] = 1.0
        return target.to(self.device, non_blocking=True)

    def __call__(self, model, teacher, batch):
        _, sims = model(self.inputs(batch.image, param_dtype(model)))
        s = sims[:, 0].float()
        terms = {"align": multi_positive_nce(s / self.cfg.align.temperature, self.positives(
            batch, s.shape[1]))}  # fmt: skip
        if self.cfg.align.probe:
            classifier = _module(model).classifier
            probe = F.linear(s.detach(), classifier.weight.float(), classifier.bias.float())
            terms["probe"] = F.cross_entropy(probe, batch.label)
        return sum(terms.values()), terms


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives ([B, K] logits and 0/1 targets): the mean over
    images with a positive of the cross-entropy against the uniform distribution over their
    positives, and likewise over concepts (softmax over the batch), averaged. No host sync:
    rows or columns without a positive are masked, not filtered."""

    def side(dim: int) -> torch.Tensor:
        n = positives.sum(dim)
        ce = -(logits.log_softmax(dim) * positives).sum(dim) / n.clamp(min=1)
        has = (n > 0).float()
        return (ce * has).sum() / has.sum().clamp(min=1)

    return (side(1) + side(0)) / 2


def resolve_loss_impl(loss: LossConfig, device: torch.device) -> str:
    """``loss.impl`` to "triton" or "torch". The kernel computes the paper variant (either
    contrastive scope); the official variant runs in PyTorch (auto) or is an error (triton)."""
    from multieye_dist.model.kernels import resolve_impl

    impl = resolve_impl(loss.impl, device)
    if impl == "triton" and loss.variant != "paper":
        if loss.impl == "triton":
            raise ValueError(
                f"loss.impl=triton computes loss.variant=paper (got {loss.variant}); use "
                "loss.impl=torch or auto"
            )
        return "torch"
    return impl
