"""Training losses for OCT-CoDA (MultiEYE): the fundus student's objective.

Pure tensor code: no I/O, no deepspeed; ``torch.distributed`` is imported lazily and only used by
``contrastive_scope="global"``. The specification is ``docs/method.md`` ("The loss, per batch")::

    L = L_cls + [gate] * (beta * L_proto + alpha * L_con)

with the release's meaning of the weights: **alpha scales the contrastive term, beta the prototype
term** (release defaults alpha=0.6, beta=0.05, T=10). Some third-party accounts swap them.

Two variants (docs/method.md, "Where the released code differs"):

* ``"paper"`` (default): prototypes carry gradient into the student; teacher anchors of the
  contrastive term are labelled with the OCT labels ``y_o``; anchors without a positive are left
  out of the mean.
* ``"official"``: the released step. Prototypes are built from detached student sims (the term
  has a value but no gradient); teacher anchors are labelled with the *fundus* labels ``y_f``; an
  anchor without a positive makes the contrastive value NaN. Because every teacher anchor is the
  partner of a fundus anchor and carries the same (fundus) label, that cannot happen in practice:
  each anchor has at least its partner as a positive.

Non-finite distillation (NaN from the official no-positive rule, or overflow from garbage sims) is
dropped from ``total`` in both variants, as the release drops NaN; ``LossOutput.prototype`` and
``.contrastive`` still report the raw values so the trainer can log or count such steps.

No host sync: the gate and the finite check stay on the device as boolean tensors and select the
term with ``torch.where`` (a Python ``if`` on them would wait for the GPU every step). Label
values are range-checked here only for direct callers (``check_labels``); the training
objectives pass False because the shard reader checked every label where the sample was read.

Precision: inputs may be bf16/fp16/fp32/fp64; everything is computed with autocast disabled in
float32 (float64 when any input is float64). float32 matmuls still follow the global TF32 setting
(``torch.backends.cuda.matmul.allow_tf32``); the prototypes use ``index_add`` (exact adds).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("paper", "official")
SCOPES: tuple[str, ...] = ("local", "global")
NUM_LEVELS = 2  # sims are [B, 2, K]: level 1 (normalised projection) and level 2 (W_4 branch)


@dataclass
class LossOutput:
    """One step's loss. ``total`` is what to backpropagate; the rest are for logging.

    ``prototype`` and ``contrastive`` are UNweighted and computed even when the gate is closed
    (so they can be logged every step); ``gated`` says whether distillation entered ``total``'s
    formula (it is still dropped if its value is not finite). ``gated`` is a boolean tensor on
    the loss's device, so that reading it is the caller's choice of when to sync.
    """

    total: torch.Tensor  # scalar
    cls: torch.Tensor  # scalar, cross-entropy of the student
    prototype: torch.Tensor  # scalar, unweighted MSE of prototypes (0 when no shared class)
    contrastive: torch.Tensor  # scalar, unweighted (L_1 + L_2) / 2
    gated: torch.Tensor  # scalar bool: did the gate open


# ----------------------------------------------------------------------------- validation


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}"
    return f"type {type(t).__name__}"


def _check_float_tensor(name: str, t: Any, ndim: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {expected}, got {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor {expected}, got {_describe(t)}")
    if t.ndim != ndim or t.shape[0] < 1:
        raise ValueError(f"{name} must be {expected} with B >= 1, got {_describe(t)}")


def _check_logits(name: str, t: Any) -> None:
    _check_float_tensor(name, t, 2, "of shape [B, num_classes]")
    if t.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes in dim 1, got {_describe(t)}")


def _check_sims(name: str, t: Any) -> None:
    _check_float_tensor(name, t, 3, f"of shape [B, {NUM_LEVELS}, K]")
    if t.shape[1] != NUM_LEVELS or t.shape[2] < 1:
        raise ValueError(f"{name} must be of shape [B, {NUM_LEVELS}, K], got {_describe(t)}")


def _check_labels(name: str, t: Any, batch: int, batch_from: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {_describe(t)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (class indices), got {_describe(t)}")
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must be of shape [B] with B={batch} (from {batch_from}), got {_describe(t)}"
        )


def _check_label_range(num_classes: int, **labels: torch.Tensor) -> None:
    # One host sync for all label tensors rather than two per tensor.
    bounds = torch.stack([f(t.long()) for t in labels.values() for f in (torch.min, torch.max)])
    values = bounds.tolist()
    for i, name in enumerate(labels):
        lo, hi = values[2 * i], values[2 * i + 1]
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) (num_classes from the logits), "
                f"got values in [{lo}, {hi}]"
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def validate_logits_and_labels(
    student_logits: Any,
    student_labels: Any,
    teacher_logits: Any = None,
    teacher_labels: Any = None,
    *,
    check_labels: bool = True,
) -> int:
    """Check a loss's logits and labels; return the number of classes C.

    Logits must be floating tensors [B, C] with B >= 1 and C >= 2, labels integer tensors [B].
    The teacher's (pass both or neither) must match the student's shape: teacher row i is the
    partner of student row i, and the gate pairs them. ``check_labels`` also checks that every
    label lies in [0, C) (one host sync for all of them). Raises TypeError (not a tensor, wrong
    dtype) or ValueError (shape, values) naming the argument. Used by :func:`octcoda_loss`,
    :func:`fundus_only_loss` and :func:`multieye_dist.model.kernels.octcoda_loss_fused`.
    """
    _check_logits("student_logits", student_logits)
    paired = teacher_logits is not None or teacher_labels is not None
    if paired:
        _check_logits("teacher_logits", teacher_logits)
    b = student_logits.shape[0]
    _check_labels("student_labels", student_labels, b, "student_logits")
    num_classes = int(student_logits.shape[1])
    labels = {"student_labels": student_labels}
    if paired:
        if teacher_logits.shape[0] != b:
            raise ValueError(
                "teacher batch must equal student batch: the gate pairs fundus sample i with OCT "
                f"partner i; got student_logits {tuple(student_logits.shape)}, teacher_logits "
                f"{tuple(teacher_logits.shape)}"
            )
        _check_labels("teacher_labels", teacher_labels, b, "teacher_logits")
        if teacher_logits.shape[1] != num_classes:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} disagree on the number of classes"
            )
        labels["teacher_labels"] = teacher_labels
    if check_labels:
        _check_label_range(num_classes, **labels)
    return num_classes


def _validate_octcoda(
    zf: Any, sf: Any, yf: Any, zo: Any, so: Any, yo: Any, temperature: float, check_labels: bool
) -> int:
    """Check the six inputs (label values too when ``check_labels``: one host sync, after every
    other check); return the number of classes."""
    num_classes = validate_logits_and_labels(zf, yf, zo, yo, check_labels=False)
    _check_sims("student_sims", sf)
    _check_sims("teacher_sims", so)
    b = zf.shape[0]
    if sf.shape[0] != b:
        raise ValueError(f"student_sims batch {sf.shape[0]} != student_logits batch {b}")
    if so.shape[0] != b:
        raise ValueError(
            "teacher batch must equal student batch: the gate pairs fundus sample i with OCT "
            f"partner i; got student_logits {tuple(zf.shape)}, teacher_sims {tuple(so.shape)}"
        )
    if so.shape[2] != sf.shape[2]:
        raise ValueError(
            f"student_sims {tuple(sf.shape)} and teacher_sims {tuple(so.shape)} disagree on K "
            "(number of concepts)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if check_labels:
        _check_label_range(num_classes, student_labels=yf, teacher_labels=yo)
    return num_classes


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Low precision is upcast: the contrastive log-sum-exp and the gate's L1 distances lose too
    # much in bf16; float64 inputs (tests, gradcheck) keep float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # Inside an autocast region a float32 matmul would silently run in bf16/fp16 again.
    if device.type in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the gate


@torch.no_grad()
def gate_distances(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (d_s, d_t, d_st): mean L1 distances between softmax outputs and one-hot labels.

    The teacher is scored against ``labels``, the *fundus* labels (docs/method.md step 2, as
    released).
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    p_s = torch.softmax(student_logits.to(dtype), dim=1)
    p_t = torch.softmax(teacher_logits.to(dtype), dim=1)
    onehot = F.one_hot(labels.long(), p_s.shape[1]).to(dtype)
    d_s = (p_s - onehot).abs().sum(1).mean()
    d_t = (p_t - onehot).abs().sum(1).mean()
    d_st = (p_t - p_s).abs().sum(1).mean()
    return d_s, d_t, d_st


def distillation_gate(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The batch gate: a scalar bool tensor on the logits' device (no host sync), True when the
    batch distils (docs/method.md step 2). ``labels``: the fundus labels (:func:`gate_distances`).

    SwitOKD's switch: distil only when the teacher is better than the student on this batch
    (d_t < d_s) and the two disagree by more than the adaptive threshold delta.
    """
    d_s, d_t, d_st = gate_distances(student_logits, teacher_logits, labels)
    eps = torch.exp(-d_t / (d_s + d_t))
    delta = d_s - eps * d_t
    return (d_st > delta) & (d_t < d_s)


def add_distillation(
    cls: torch.Tensor,
    distill: torch.Tensor,
    gate_open: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``cls + distill`` where the gate is open and ``distill`` is finite, else ``cls`` in value,
    decided on the device (no host sync).

    The distillation graph is always part of ``total``, so every rank runs the same backward and
    DDP/ZeRO never meet a parameter (W_4) that got no gradient on one rank only. Its gradient is
    zero when the term is not used. ``inputs`` are the tensors the term was computed from (views
    made for it alone): when the term is not finite, its backward may produce NaN (0 * inf) even
    under a zero upstream gradient, so a hook replaces their gradient with zeros in that case.
    """
    finite = distill.isfinite()

    def guard(g: torch.Tensor | None) -> torch.Tensor | None:
        return None if g is None else torch.where(finite, g, torch.zeros_like(g))

    for x in inputs:
        if x.requires_grad:
            x.register_hook(guard)
    used = torch.where(gate_open & finite, distill, torch.zeros_like(distill))
    return cls + used.to(cls.dtype)


# ----------------------------------------------------------------------------- prototypes


def class_prototypes(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``sims`` [B, L, K] -> (prototypes [C, L, K], counts [C]).

    Classes absent from the batch get a zero prototype and count 0.
    """
    b = sims.shape[0]
    flat = sims.reshape(b, -1)
    labels = labels.long()
    # index_add rather than a one-hot matmul: exact float adds even when TF32 matmuls are on.
    sums = flat.new_zeros((num_classes, flat.shape[1])).index_add(0, labels, flat)
    # Not bincount: on CUDA it reads the largest label back to the host to size its output.
    counts = flat.new_zeros(num_classes).index_add(0, labels, flat.new_ones(b))
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return means.view(num_classes, *sims.shape[1:]), counts


def prototype_loss(
    student_sims: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_sims: torch.Tensor,
    teacher_labels: torch.Tensor,
    num_classes: int,
    *,
    variant: str = "paper",
) -> torch.Tensor:
    """Global prototypical distillation (docs/method.md step 3), unweighted.

    MSE between student and teacher class means over the classes present on BOTH sides, both
    levels and all K; 0 (no NaN) when no class is shared. The teacher is a constant. ``"official"``
    builds the student means from detached sims, so the value carries no gradient.
    """
    _check_choice("variant", variant, VARIANTS)
    student = student_sims.detach() if variant == "official" else student_sims
    p_f, n_f = class_prototypes(student, student_labels, num_classes)
    p_o, n_o = class_prototypes(teacher_sims.detach(), teacher_labels, num_classes)
    shared = (n_f > 0) & (n_o > 0)
    per_class = (p_f - p_o).pow(2).flatten(1).sum(1)
    # Mask, don't index: boolean indexing would force a host sync every step.
    total = torch.where(shared, per_class, torch.zeros_like(per_class)).sum()
    n_terms = shared.sum().clamp(min=1) * p_f[0].numel()
    return total / n_terms


# ----------------------------------------------------------------------------- contrastive


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    *,
    anchor_slice: slice | None = None,
    no_positive: str = "skip",
) -> torch.Tensor:
    """Supervised contrastive loss on un-normalised ``features`` [N, K] (one level).

    logits_jk = x_j . x_k / T; the denominator of anchor j runs over every k != j; its positives
    are all k != j with labels[k] == labels[j]; loss = -mean_j mean_{k in P(j)} log softmax_j(k).
    Anchors j are the rows in ``anchor_slice`` (default all; the global scope passes this rank's
    rows of a gathered batch) while k ranges over all N rows.

    ``no_positive``: ``"skip"`` leaves anchors without a positive out of the mean (0 if none
    has one); ``"nan"`` reproduces the release's 0/0, making the whole value NaN.
    """
    _check_choice("no_positive", no_positive, ("skip", "nan"))
    n_all = features.shape[0]
    if features.ndim != 2 or n_all < 2 or labels.shape != (n_all,):
        raise ValueError(
            f"supcon_loss needs features [N>=2, K] and labels [N], got features "
            f"{tuple(features.shape)}, labels {tuple(labels.shape)}"
        )
    sl = anchor_slice if anchor_slice is not None else slice(0, n_all)
    start, stop, step = sl.indices(n_all)
    if step != 1 or stop <= start:
        raise ValueError(f"anchor_slice must be a non-empty contiguous slice, got {sl}")
    anchors, anchor_labels = features[start:stop], labels[start:stop]
    device = features.device

    logits = anchors @ features.T / temperature  # [n, N]
    rows = torch.arange(start, stop, device=device).unsqueeze(1)
    self_mask = rows == torch.arange(n_all, device=device).unsqueeze(0)
    # logsumexp subtracts the row max (over k != j) before exp, the usual SupCon stabilisation;
    # masking self with -inf excludes it from the denominator without changing the value.
    log_denom = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    log_prob = logits - log_denom

    positives = (anchor_labels.unsqueeze(1) == labels.unsqueeze(0)) & ~self_mask
    n_pos = positives.sum(1)
    zero = log_prob.new_zeros(())
    mean_pos = torch.where(positives, log_prob, zero).sum(1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    if no_positive == "nan":
        # The NaN is a constant, so gradients of the other anchors stay finite.
        return -torch.where(has_pos, mean_pos, log_prob.new_full((), float("nan"))).mean()
    return -torch.where(has_pos, mean_pos, zero).sum() / has_pos.sum().clamp(min=1)


def dist_world() -> tuple[int, int] | None:
    """(rank, world_size) when a process group of world size > 1 is initialised, else None:
    whether ``contrastive_scope="global"`` (here and in the fused kernel) communicates."""
    import torch.distributed as dist  # lazy: the library imports without a process group

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def _all_gather_rows(x: torch.Tensor, rank: int, world: int) -> list[torch.Tensor]:
    """All-gather ``x`` along dim 0 (ragged sizes allowed); this rank's slot is ``x`` itself.

    The gathered copies carry no gradient; keeping the local tensor in its slot lets gradient flow
    to this rank's own anchors (as anchors and as contrast candidates of its own anchors). Other
    ranks' losses do not send gradient here: DDP's gradient averaging combines the ranks.
    """
    import torch.distributed as dist

    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in torch.cat(sizes).tolist()]
    padded = x.detach().new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    parts = [o[:c] for o, c in zip(out, counts, strict=True)]
    parts[rank] = x
    return parts


def contrastive_loss(
    student_sims: torch.Tensor,
    teacher_sims: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    temperature: float = 10.0,
    variant: str = "paper",
    scope: str = "local",
) -> torch.Tensor:
    """Local contrastive distillation (docs/method.md step 4), unweighted: (L_1 + L_2) / 2.

    Anchors per level are cat(S_f[:, l], S_o[:, l]); teacher rows are constants. Anchor labels are
    cat(y_f, y_f) for ``"official"`` and cat(y_f, y_o) for ``"paper"``. ``scope="global"`` gathers
    every rank's anchors as contrast candidates (the loss still averages over this rank's anchors);
    without an initialised multi-process group it equals ``"local"``. Every rank must call this
    (collectives), which :func:`octcoda_loss` does whether or not its gate opened.
    """
    _check_choice("variant", variant, VARIANTS)
    _check_choice("scope", scope, SCOPES)
    teacher_anchor_labels = student_labels if variant == "official" else teacher_labels
    feats = torch.cat([student_sims, teacher_sims.detach()], dim=0)  # [2B, L, K]
    labels = torch.cat([student_labels, teacher_anchor_labels]).long()
    n_local, start = feats.shape[0], 0
    world = dist_world() if scope == "global" else None
    if world is not None:
        rank, size = world
        feat_parts = _all_gather_rows(feats, rank, size)
        label_parts = _all_gather_rows(labels, rank, size)
        start = sum(p.shape[0] for p in feat_parts[:rank])
        feats, labels = torch.cat(feat_parts), torch.cat(label_parts)
    no_positive = "nan" if variant == "official" else "skip"
    per_level = [
        supcon_loss(
            feats[:, level],
            labels,
            temperature,
            anchor_slice=slice(start, start + n_local),
            no_positive=no_positive,
        )
        for level in range(feats.shape[1])
    ]
    return torch.stack(per_level).mean()


# ----------------------------------------------------------------------------- the losses

#: ``distill_terms(dtype, student_labels, teacher_labels) -> (prototype, contrastive, inputs)``:
#: the unweighted distillation terms in ``dtype``, and the tensors they were computed from (views
#: made for them alone, for :func:`add_distillation`). The labels are int64.
DistillTerms = Callable[
    [torch.dtype, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]],
]


def octcoda_loss_from_terms(
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    distill_terms: DistillTerms,
    *,
    alpha: float,
    beta: float,
    upcast_with: tuple[torch.Tensor, ...] = (),
) -> LossOutput:
    """The OCT-CoDA loss around distillation terms computed by the caller: what the PyTorch
    (:func:`octcoda_loss`) and the fused (:func:`multieye_dist.model.kernels.octcoda_loss_fused`)
    implementations share.

    With autocast disabled and in float32 (float64 when a logit tensor or one of ``upcast_with``
    is float64): ``cls`` = cross-entropy of the student, the gate (:func:`distillation_gate`),
    then ``distill_terms`` (:data:`DistillTerms`; it runs whatever the gate says, so every rank
    runs the same collectives), and ``total = cls + gate * (beta * prototype + alpha *
    contrastive)`` with a non-finite term dropped (:func:`add_distillation`). Teacher logits are
    constants. The inputs must have been validated (:func:`validate_logits_and_labels`).
    """
    dtype = _compute_dtype(student_logits, teacher_logits, *upcast_with)
    with _no_autocast(student_logits.device):
        zf, zo = student_logits.to(dtype), teacher_logits.to(dtype).detach()
        yf, yo = student_labels.long(), teacher_labels.long()
        cls = F.cross_entropy(zf, yf)
        gate_open = distillation_gate(zf, zo, yf)
        proto, con, inputs = distill_terms(dtype, yf, yo)
        total = add_distillation(cls, beta * proto + alpha * con, gate_open, inputs)
    return LossOutput(total=total, cls=cls, prototype=proto, contrastive=con, gated=gate_open)


def octcoda_loss(
    student_logits: torch.Tensor,
    student_sims: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_sims: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    alpha: float = 0.6,
    beta: float = 0.05,
    temperature: float = 10.0,
    variant: str = "paper",
    contrastive_scope: str = "local",
    check_labels: bool = True,
) -> LossOutput:
    """OCT-CoDA student loss: ``cls + gate * (beta * prototype + alpha * contrastive)``.

    alpha weights the CONTRASTIVE term and beta the PROTOTYPE term (the release's meaning).
    Shapes: logits [B, C], sims [B, 2, K], labels [B] (integer); teacher batch == student batch
    (row i of the teacher is the OCT partner of fundus sample i). Teacher inputs are treated as
    constants. ``variant`` is ``"paper"`` or ``"official"`` (module docstring).

    The distillation term is always computed, and with the gate closed it enters with a zero
    gradient: ``total`` equals ``cls`` in value, but every rank runs the same graph and the
    same collectives (global scope), so DDP/ZeRO never see parameters (W_4) that got no
    gradient on one rank only. A non-finite term is dropped (``total = cls``), as the release
    drops NaN; the raw values stay in the output (:func:`add_distillation`). ``check_labels``
    checks label values against the number of classes (one host sync).
    """
    _check_choice("variant", variant, VARIANTS)
    _check_choice("contrastive_scope", contrastive_scope, SCOPES)
    num_classes = _validate_octcoda(
        student_logits,
        student_sims,
        student_labels,
        teacher_logits,
        teacher_sims,
        teacher_labels,
        temperature,
        check_labels,
    )

    def terms(
        dtype: torch.dtype, yf: torch.Tensor, yo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        sf = student_sims.to(dtype).view_as(student_sims)  # the terms' own node (add_distillation)
        so = teacher_sims.to(dtype).detach()
        proto = prototype_loss(sf, yf, so, yo, num_classes, variant=variant)
        con = contrastive_loss(
            sf, so, yf, yo, temperature=temperature, variant=variant, scope=contrastive_scope
        )
        return proto, con, (sf,)

    return octcoda_loss_from_terms(
        student_logits, student_labels, teacher_logits, teacher_labels, terms,
        alpha=alpha, beta=beta, upcast_with=(student_sims, teacher_sims),
    )  # fmt: skip


def fundus_only_loss(
    student_logits: torch.Tensor, student_labels: torch.Tensor, *, check_labels: bool = True
) -> LossOutput:
    """Cross-entropy alone (the fundus baseline): no teacher, no distillation terms (reported as
    0, the gate as closed). ``check_labels`` as in :func:`octcoda_loss`."""
    validate_logits_and_labels(student_logits, student_labels, check_labels=check_labels)
    dtype = _compute_dtype(student_logits)
    with _no_autocast(student_logits.device):
        cls = F.cross_entropy(student_logits.to(dtype), student_labels.long())
    zero = cls.new_zeros(())
    closed = torch.zeros((), dtype=torch.bool, device=cls.device)
    return LossOutput(total=cls, cls=cls, prototype=zero, contrastive=zero.clone(), gated=closed)
