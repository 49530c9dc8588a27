"""Fused concept-similarity distillation step: the ``"paper"`` prototype and contrastive terms
(local or global scope) of OCT-CoDA computed from embeddings in three Triton kernels (two
forward, one backward).

The reference is :mod:`multieye_dist.model.losses` on ``sims = einsum("bld,kd->blk", emb,
concepts)``: ``prototype_loss(..., variant="paper")`` and
``contrastive_loss(..., variant="paper", scope="local" | "global")``. What the kernels do
differently:

* The sims are computed in the kernel (fp32 accumulation) and never leave it as a graph tensor.
* The contrastive log-sum-exp streams over the 2B candidates (online log-sum-exp) so the
  2B x 2B logit matrix is never held; the backward recomputes it tile by tile from the stored
  per-anchor log-sum-exp (as flash attention does). The positive term needs no matrix at all:
  ``sum_{k in P(j)} x_j . x_k = x_j . (G[y_j] - x_j)`` with ``G`` the per-class sums.
* Gradients: to ``student_emb`` always, to ``concepts`` when it requires grad (through the
  student sims only: the reference detaches the teacher sims, and so does this). The teacher
  embeddings are constants and get no gradient, whatever their ``requires_grad``.
* ``scope="global"`` (``contrastive_loss(scope="global")``): after the sims kernel, one
  all-reduce of this rank's class sums [2, NC, K] and counts [NC] (fp32, with the ragged row
  counts appended: 4 (2 NC K + NC + world) bytes) and one all-gather of the sims [2, 2B, K] in
  the working dtype (padded to the largest rank). The forward streams each local anchor over
  all M_total candidates, the backward recomputes the same tiles; nothing is communicated in the
  backward, and no gradient reaches other ranks' rows. Memory: the gathered sims
  [2, M_total, K] and one LSE per candidate, linear in the anchors (the PyTorch loss holds
  [2B, M_total] logits per level). Labels are not gathered: other ranks' anchors enter only as
  softmax candidates and through the class sums. See ``benchmarks/bench_global_scope.py``.

Precision: the sims are accumulated in fp32 and stored once in the inputs' dtype (bf16/fp16:
rounded, exactly as the model's own sims are under autocast before ``octcoda_loss`` upcasts
them); from those stored values on, everything is fp32 arithmetic (tensor-core dots take the
16-bit sims and the 16-bit softmax weights with fp32 accumulation). So in bf16 the kernel
computes the reference loss of the bf16-rounded sims. fp32 inputs use exact fp32 products (no
TF32), except the final d(emb) = d(sims) @ C, which uses TF32 for 16-bit inputs. Class sums and
the two scalars are accumulated with atomics, so the last bits can differ between runs.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

_TRITON_MODULE = "multieye_dist.model.kernels.distill_triton"
MAX_CONCEPTS = 256  # K: a whole row of sims lives in registers in the streaming loops
_DOT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CLASS_BLOCK = 16  # classes per one-hot tile (tl.dot needs >= 16)


def triton_available() -> bool:
    """Whether triton can be imported (it is an optional accelerator, not a dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """Whether triton kernels would run under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not triton_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def _triton_module() -> ModuleType:
    """The kernel module, imported now, or re-imported if ``TRITON_INTERPRET`` changed since.

    ``@triton.jit`` picks compiled or interpreted execution when the decorator runs; a module
    imported before a test set ``TRITON_INTERPRET=1`` would hold compiled kernels that cannot
    take CPU tensors.
    """
    if not triton_available():
        raise RuntimeError(
            "the Triton distillation kernel needs the 'triton' package, which is not installed; "
            "set loss.impl=torch (or auto) to use the PyTorch loss"
        )
    mod = sys.modules.get(_TRITON_MODULE)
    if mod is None:
        return importlib.import_module(_TRITON_MODULE)
    if mod.INTERPRETED != interpret_mode():
        logger.debug("re-importing %s: TRITON_INTERPRET changed", _TRITON_MODULE)
        mod = importlib.reload(mod)
    return mod


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes. Untuned guesses for an H100 (no GPU was available when this was written);
    the interpreter uses small tiles so that small test shapes span several tiles."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int

    @staticmethod
    def choose(block_k: int, interpret: bool) -> LaunchConfig:
        if interpret:
            return LaunchConfig(block_m=16, block_n=16, block_d=16, num_warps=1)
        if block_k <= 128:
            return LaunchConfig(block_m=64, block_n=64, block_d=64, num_warps=4)
        # K up to 256: a [64, 256] fp32 gradient accumulator per program; narrower column tiles
        # and more warps keep it in registers.
        return LaunchConfig(block_m=64, block_n=32, block_d=32, num_warps=8)


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"type {type(t).__name__}"


def _validate(
    student_emb: Any,
    teacher_emb: Any,
    concepts: Any,
    student_labels: Any,
    teacher_labels: Any,
    num_classes: int,
    temperature: float,
) -> None:
    """Shapes, dtypes and devices (no host sync: label values are the caller's to check)."""
    for name, t in (("student_emb", student_emb), ("teacher_emb", teacher_emb)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[1] != 2 or t.shape[0] < 1:
            raise ValueError(f"{name} must be [B>=1, 2, D] (levels 1 and 2), got {_describe(t)}")
    if not isinstance(concepts, torch.Tensor) or concepts.ndim != 2 or concepts.shape[0] < 1:
        raise ValueError(f"concepts must be [K>=1, D], got {_describe(concepts)}")
    b, _, d = student_emb.shape
    if teacher_emb.shape != student_emb.shape:
        raise ValueError(
            f"teacher_emb {tuple(teacher_emb.shape)} must match student_emb "
            f"{tuple(student_emb.shape)}: row i of the teacher is the partner of student row i"
        )
    if concepts.shape[1] != d:
        raise ValueError(f"concepts {tuple(concepts.shape)} must have D={d} like the embeddings")
    if concepts.shape[0] > MAX_CONCEPTS:
        raise ValueError(
            f"the fused kernel supports K <= {MAX_CONCEPTS} concepts, got K={concepts.shape[0]}; "
            "use loss.impl=torch"
        )
    floats = {"student_emb": student_emb, "teacher_emb": teacher_emb, "concepts": concepts}
    for name, t in floats.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {_describe(t)}")
    if student_emb.dtype not in _DOT_KINDS:
        # The teacher and the bank are cast to the student's dtype; the student's sets the math.
        raise TypeError(
            "student_emb must be float32, bfloat16 or float16 for the Triton kernel, got "
            f"{student_emb.dtype}; use loss.impl=torch for other dtypes"
        )
    for name, t in (("student_labels", student_labels), ("teacher_labels", teacher_labels)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"{name} must be [B={b}], got {_describe(t)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got {_describe(t)}")
    devices = {str(t.device) for t in (*floats.values(), student_labels, teacher_labels)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(devices)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # The kernels index with 32-bit offsets.
    spans = [
        sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
        for t in floats.values()
    ]
    if 2 * (2 * b) * _next_pow2(concepts.shape[0]) >= 2**31 or max(spans) >= 2**31:
        raise ValueError(f"inputs too large for the kernel's 32-bit offsets (B={b}, D={d})")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


SCOPES: tuple[str, ...] = ("local", "global")


class Exchange(Protocol):
    """How the global scope meets the other ranks' anchors: called once per forward with this
    rank's sims ``x`` [2 levels, M, K] (M = 2B) and ``stats`` (float32, 1-D: this rank's class
    sums [2 levels, NC, K] and counts [NC], both sides together), it returns the candidates of
    every rank [2, M_total, K] (this rank's rows in place at ``row0``), ``row0`` and the sum of
    ``stats`` over the ranks. Implementations: :class:`ProcessGroupExchange` (training),
    :class:`SimulatedPeers` (one process standing in for the others: benchmarks)."""

    def __call__(
        self, x: torch.Tensor, stats: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]: ...


class ProcessGroupExchange:
    """The global scope over the default process group: two collectives per step, both in the
    forward (the backward sends nothing: no gradient goes to other ranks' rows).

    1. ``all_reduce`` of ``stats`` with this rank's row count appended in its slot of a
       world-long vector (so the ragged sizes travel with the class sums: no extra round trip);
    2. ``all_gather`` of the sims, padded to the largest rank's M (gloo and NCCL gather equal
       shapes), then cut and concatenated in rank order.

    The sims are gathered rather than the embeddings because K <= 256 is below the embedding
    width in practice (D = 512 here), and the kernels stream over sims. Labels of other ranks are
    not needed: their anchors enter only as softmax candidates (no label) and through the class
    sums. Reading the sizes back is one host sync, as in the PyTorch global scope
    (``losses.contrastive_loss``).
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(
        self, x: torch.Tensor, stats: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        import torch.distributed as dist  # lazy: the library imports without a process group

        m = x.shape[1]
        if m >= 2**24:  # the row counts travel as float32 in the all-reduce
            raise ValueError(f"global scope: {m} anchors on one rank is too many (< 2**24)")
        sizes = torch.zeros(self.world, device=x.device, dtype=torch.float32)
        sizes[self.rank] = m
        buf = torch.cat([stats, sizes])
        dist.all_reduce(buf)
        counts = [int(c) for c in buf[-self.world :].tolist()]
        widest = max(counts)
        padded = x if m == widest else torch.cat([x, x.new_zeros((2, widest - m, x.shape[2]))], 1)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded.contiguous())
        out[self.rank] = x  # this rank's own values, not a round trip's copy
        x_all = torch.cat([o[:, :c] for o, c in zip(out, counts, strict=True)], dim=1)
        return x_all, sum(counts[: self.rank]), buf[: -self.world]


class SimulatedPeers:
    """Other ranks' anchors given as tensors, in one process: ``sims`` [2, N_other, K] in the
    working dtype and their ``labels`` [N_other]; the first ``before`` of them are placed ahead of
    this rank's rows (a rank > 0). For benchmarks (the global scope's memory and time on one
    GPU) and the AOT launch recorder."""

    def __init__(
        self, sims: torch.Tensor, labels: torch.Tensor, num_classes: int, before: int = 0
    ) -> None:
        if not 0 <= before <= sims.shape[1]:
            raise ValueError(f"before={before} must lie in [0, {sims.shape[1]}] (peer rows)")
        self.sims, self.labels, self.num_classes = sims, labels.long(), num_classes
        self.before = before

    def __call__(
        self, x: torch.Tensor, stats: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        k, nc = x.shape[2], self.num_classes
        other = self.sims.to(x.dtype).float().permute(1, 0, 2).reshape(-1, 2 * k)
        sums = other.new_zeros((nc, 2 * k)).index_add_(0, self.labels, other)
        counts = other.new_zeros(nc).index_add_(0, self.labels, other.new_ones(len(self.labels)))
        extra = torch.cat([sums.view(nc, 2, k).transpose(0, 1).flatten(), counts])
        peers = self.sims.to(x.dtype)
        x_all = torch.cat([peers[:, : self.before], x, peers[:, self.before :]], dim=1)
        return x_all, self.before, stats + extra.to(stats.device)


def default_exchange() -> Exchange | None:
    """The process-group exchange when a group of world > 1 is initialised, else None (then the
    global scope is the local one, as in ``losses.contrastive_loss``)."""
    from multieye_dist.model.losses import dist_world

    world = dist_world()
    return None if world is None else ProcessGroupExchange(*world)


def _exchange(
    exchange: Exchange, x: torch.Tensor, g: torch.Tensor, cnt: torch.Tensor, nc: int, k: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X of every rank, row0, GP forward, GP backward, CP) of the global scope (layouts in
    distill_triton's docstring): the class sums of both sides over every rank [2, NC, K]; the
    same plus this rank's own, for the backward; the class counts over every rank [NC]."""
    own = g.view(2, 2 * nc * k).sum(0)
    stats = torch.cat([own, cnt.view(2, nc).sum(0)])
    x_all, row0, total = exchange(x, stats)
    if x_all.ndim != 3 or x_all.shape[0] != 2 or x_all.shape[2] != k or total.shape != stats.shape:
        raise ValueError(
            f"exchange returned sims {tuple(x_all.shape)} and stats {tuple(total.shape)}; "
            f"expected [2, M_total, {k}] and {tuple(stats.shape)}"
        )
    if 2 * x_all.shape[1] * _next_pow2(k) >= 2**31:
        raise ValueError(
            f"global scope: {x_all.shape[1]} candidates are too many for the kernel's 32-bit "
            "offsets; use loss.contrastive_scope=local or fewer ranks"
        )
    g_all = total[: 2 * nc * k]
    return x_all.contiguous(), row0, g_all, g_all + own, total[2 * nc * k :]


class _FusedDistill(torch.autograd.Function):
    """(student_emb, teacher_emb, concepts, y_f, y_o) -> [prototype, contrastive] (one tensor)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        concepts: torch.Tensor,
        student_labels: torch.Tensor,
        teacher_labels: torch.Tensor,
        num_classes: int,
        temperature: float,
        config: LaunchConfig | None,
        exchange: Exchange | None,
    ) -> torch.Tensor:
        mod = _triton_module()
        if student_emb.device.type != "cuda" and not mod.INTERPRETED:
            raise ValueError(
                f"the Triton kernel needs CUDA tensors, got {student_emb.device} (CPU only under "
                "triton's interpreter, TRITON_INTERPRET=1); use loss.impl=torch or auto"
            )
        b, _, d = student_emb.shape
        k = concepts.shape[0]
        m = 2 * b
        dev = student_emb.device
        block_k = max(16, _next_pow2(k))
        cfg = config or LaunchConfig.choose(block_k, bool(mod.INTERPRETED))
        dot_kind = _DOT_KINDS[student_emb.dtype]
        emulate = bool(mod.INTERPRETED)

        # One zeroed allocation for everything accumulated with atomics: G, CNT, OUT.
        n_g = 2 * 2 * num_classes * k
        work = torch.zeros(n_g + 2 * num_classes + 2, device=dev, dtype=torch.float32)
        g, cnt, out = work[:n_g], work[n_g : n_g + 2 * num_classes], work[n_g + 2 * num_classes :]
        # The sims in the working precision (see distill_triton's docstring).
        x = torch.empty((2, m, k), device=dev, dtype=student_emb.dtype)
        es, et, c = student_emb, teacher_emb, concepts

        grid_rows = -(-b // cfg.block_m)
        mod._sims_kernel[(grid_rows, 2, 2)](
            es, et, c, student_labels, teacher_labels, x, g, cnt,
            b, m, k, d, num_classes,
            es.stride(0), es.stride(1), et.stride(0), et.stride(1), *c.stride(),
            BLOCK_M=cfg.block_m, BLOCK_K=block_k, BLOCK_D=cfg.block_d, BLOCK_C=_CLASS_BLOCK,
            DOT_KIND=dot_kind, EMULATE=emulate,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        # Local scope: the positive term's class sums are this rank's. Global: every rank's
        # candidates and class sums; +inf marks other ranks' rows as no anchor of this loss.
        x_all, row0, gp, gp_back, cp = x, 0, g, g, cnt  # (GP, CP unused locally)
        if exchange is not None:
            x_all, row0, gp, gp_back, cp = _exchange(exchange, x, g, cnt, num_classes, k)
        n_all = x_all.shape[1]
        lse = torch.empty((2, n_all), device=dev, dtype=torch.float32)  # local: all written
        if exchange is not None:
            lse.fill_(float("inf"))
        mod._forward_kernel[(grid_rows, 2, 2)](
            x_all, student_labels, teacher_labels, g, cnt, gp, cp, lse, out,
            b, n_all, row0, k, num_classes, 1.0 / temperature,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_C=_CLASS_BLOCK,
            DOT_KIND=dot_kind, EMULATE=emulate, GLOBAL=exchange is not None,
            num_warps=cfg.num_warps,
        )  # fmt: skip

        # The embeddings are needed only for d(concepts) = dx^T e.
        emb_for_concepts = student_emb if concepts.requires_grad else None
        saved = (x_all, g, cnt, gp_back, cp, lse, concepts, student_labels, emb_for_concepts)
        ctx.save_for_backward(*saved)
        launch = (block_k, cfg, dot_kind, emulate, exchange is not None)
        ctx.meta = (b, n_all, row0, k, d, num_classes, temperature, launch)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, g, cnt, gp, cp, lse, concepts, student_labels, student_emb = ctx.saved_tensors
        b, m, row0, k, d, num_classes, temperature, launch = ctx.meta
        block_k, cfg, dot_kind, emulate, is_global = launch
        mod = _triton_module()
        need_emb, _, need_concepts = ctx.needs_input_grad[:3]
        grad = grad_out.detach().to(torch.float32).contiguous()
        d_emb = torch.empty((b, 2, d), device=x.device, dtype=concepts.dtype)
        d_x = torch.empty(
            (2, b, k) if need_concepts else (1,), device=x.device, dtype=torch.float32
        )
        mod._backward_kernel[(-(-b // cfg.block_m), 2)](
            x, student_labels, g, cnt, gp, cp, lse, concepts, d_emb, d_x, grad,
            b, m, row0, k, d, num_classes, 1.0 / temperature,
            *d_emb.stride(), *concepts.stride(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_D=cfg.block_d,
            BLOCK_C=_CLASS_BLOCK, DOT_KIND=dot_kind, EMULATE=emulate, STORE_DX=need_concepts,
            GLOBAL=is_global, num_warps=cfg.num_warps,
        )  # fmt: skip
        d_concepts = None
        if need_concepts:
            # dC = sum over levels and student rows of dx^T e (the teacher sims are constants).
            d_concepts = torch.einsum("lbk,bld->kd", d_x, student_emb.float()).to(concepts.dtype)
        return (d_emb if need_emb else None), None, d_concepts, *([None] * 6)


def fused_distill(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    concepts: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    num_classes: int,
    temperature: float,
    scope: str = "local",
    exchange: Exchange | None = None,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UNweighted (prototype, contrastive) of the ``"paper"`` variant, from embeddings.

    ``student_emb``/``teacher_emb`` are [B, 2, D] (level-1 embedding v, level-2 embedding u),
    ``concepts`` [K, D] (K <= 256); sims = emb @ concepts^T are formed inside the kernel. Equal to
    ``prototype_loss(sims_f, y_f, sims_o, y_o, num_classes, variant="paper")`` and
    ``contrastive_loss(sims_f, sims_o, y_f, y_o, temperature=T, variant="paper",
    scope=scope)``. The teacher embeddings and concepts are cast to the student's dtype (as
    the model casts its concept bank to the activations' dtype). Both outputs are float32
    scalars. Labels must lie in [0, num_classes) (not checked here: that needs a host sync;
    :func:`octcoda_loss_fused` checks). ``config`` overrides the tile sizes (tests).

    ``scope="global"``: every rank's anchors are contrast candidates, the loss averages over this
    rank's anchors, gradient flows to this rank's rows only; the prototype term stays per rank.
    Every rank must call this (two collectives in the forward, none in the backward). Without a
    process group of world > 1 it is the local scope. ``exchange`` replaces the process group
    (:class:`SimulatedPeers`: one process standing in for the others); only with global.
    """
    _validate(
        student_emb, teacher_emb, concepts, student_labels, teacher_labels, num_classes, temperature
    )
    if scope not in SCOPES:
        raise ValueError(f"unknown contrastive scope {scope!r}; expected one of {SCOPES}")
    if scope == "local" and exchange is not None:
        raise ValueError("an exchange is only used by scope='global'")
    if scope == "global" and exchange is None:
        exchange = default_exchange()
    dtype = student_emb.dtype

    def unit_stride(t: torch.Tensor) -> torch.Tensor:
        # The kernel reads the embeddings' rows as contiguous D-vectors.
        return t if t.stride(-1) == 1 else t.contiguous()

    out = _FusedDistill.apply(
        unit_stride(student_emb),
        unit_stride(teacher_emb.detach().to(dtype)),
        concepts.to(dtype),
        student_labels.contiguous(),
        teacher_labels.contiguous(),
        int(num_classes),
        float(temperature),
        config,
        exchange,
    )
    proto, con = out.unbind(0)
    return proto, con
