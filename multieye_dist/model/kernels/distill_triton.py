"""Triton kernels of the fused concept-similarity distillation step (see ``distill.py``).

This module imports triton at the top and is only imported on demand (``_triton_module`` in
``distill.py``). Whether a ``@triton.jit`` function runs compiled or under the interpreter is
decided when the decorator runs, i.e. when this module is imported; ``INTERPRETED`` records that
so the loader can re-import the module if ``TRITON_INTERPRET`` changed since.

Layout of the work buffers (contiguous; float32 except ``X``):

* ``X`` [2 levels, M, K]: the concept similarities of all M = 2B anchors (rows 0..B-1 the
  student, rows B..2B-1 the teacher), accumulated in fp32 and stored in the inputs' precision,
  as the model's own sims are under autocast. Everything downstream (class sums, prototypes,
  logits, gradients) is computed in fp32 from these stored values, so the kernels compute the
  reference loss of exactly these sims; mixing the rounded copy (for the tensor-core dots) with
  an fp32 copy (for the rest) would break the exact cancellations between the softmax part and
  the positive part of the contrastive gradient.
* ``G`` [2 sides, 2 levels, NC, K]: per-class sums of the sims of each side (side 0 student,
  labelled by y_f; side 1 teacher, labelled by y_o).
* ``CNT`` [2 sides, NC]: per-class counts of each side.
* ``OUT`` [2]: (prototype, contrastive), accumulated with atomics.
* ``LSE`` [2 levels, M]: per anchor ``lse_j + log(A)`` where ``lse_j`` is the log-sum-exp of its
  logits over k != j and A the number of anchors with a positive; +inf for an anchor without a
  positive. ``exp(s_jk - LSE_j)`` is then anchor j's softmax weight already scaled by its weight
  1/A in the mean, and 0 for anchors left out of the mean.

The global contrastive scope (constexpr ``GLOBAL``) runs the same kernels on the candidates of
every rank: ``X`` is then the all-gathered [2, M_total, K] (this rank's 2B rows start at
``ROW0``); ``CP`` [NC] holds the class counts of every rank's anchors and ``GP`` [2 levels, NC,
K] the class sums the positive term needs, both sides together: every rank's for the forward
(``x_j . (GP[y_j] - x_j)``), every rank's plus this rank's own for the backward (a row is in
its own positive sum and in those of this rank's anchors of its class only). ``G``/``CNT`` stay
this rank's own: the prototype term is per rank, and the anchors of the mean are this rank's.
``LSE`` is +inf on other ranks' rows, so the backward's ``exp(s - LSE_j)`` gives their anchors
no weight: a row's gradient is its anchor part (over all candidates) plus its candidate part
from this rank's anchors only, as in the PyTorch global scope. Without ``GLOBAL`` (local scope)
``GP``/``CP``/``ROW0`` are unused, ``M = 2B``, and the code is the local kernel's as it was.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

# DOT_KIND: 0 = float32 operands, exact fp32 products ("ieee", no TF32); 1 = bfloat16 operands;
# 2 = float16 operands. Accumulation is float32 in every case.


# Reductions through tl.reduce with triton's own combine functions instead of tl.sum/tl.max:
# those (like tl.zeros) are @triton.jit functions of triton.language.standard, decorated
# compiled-or-interpreted once, when triton is first imported. Builtins and our own helpers
# follow this module's (re-)import, so the kernels also run under the interpreter in a process
# that imported triton before setting TRITON_INTERPRET (the test suite does exactly that, to
# leave triton itself in compiled mode for everything else). The interpreter recognises these
# two combine functions and reduces with numpy.


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _to_lo(x, DOT_KIND: tl.constexpr, EMULATE: tl.constexpr):
    """x rounded to the kind's precision (round to nearest even, as the GPU's conversion).

    Compiled: a bf16/fp16 tensor. Under the interpreter: an fp32 tensor holding the rounded
    values, because the interpreter's dot multiplies the raw 16-bit patterns of bf16 as integers
    and its fp32 -> bf16 conversion truncates; the fp32 copy keeps the numerics of a
    low-precision dot with fp32 accumulation.
    """
    if DOT_KIND == 0:
        out = x.to(tl.float32)
    elif EMULATE:
        if DOT_KIND == 1:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(tl.float16).to(tl.float32)  # numpy's conversion rounds to nearest
    elif DOT_KIND == 1:
        out = x.to(tl.bfloat16)
    else:
        out = x.to(tl.float16)
    return out


@triton.jit
def _mm(a, b, DOT_KIND: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b with float32 accumulation, operands rounded to the kind's precision."""
    if DOT_KIND == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif EMULATE:
        lo_a = _to_lo(a.to(tl.float32), DOT_KIND, EMULATE)
        lo_b = _to_lo(b.to(tl.float32), DOT_KIND, EMULATE)
        out = tl.dot(lo_a, lo_b, input_precision="ieee")
    else:
        out = tl.dot(_to_lo(a, DOT_KIND, EMULATE), _to_lo(b, DOT_KIND, EMULATE))
    return out


@triton.jit
def _anchor_stats(CP, CNT, NC, BLOCK_C: tl.constexpr, GLOBAL: tl.constexpr):
    """(A, n_shared): this rank's anchors with a positive (their class counts >= 2 anchors over
    all candidates, ``CP``; locally ``CNT`` itself), and classes present on both of this rank's
    sides (``CNT``). Classes are few; every program recomputes this from the counts.
    (Loop-carried values are vectors reduced after the loop: a Python-float start value would
    change type inside the loop.)"""
    n_anchor = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    n_shared = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        ok = cc < NC
        cs = tl.load(CNT + cc, mask=ok, other=0.0)
        ct = tl.load(CNT + NC + cc, mask=ok, other=0.0)
        if GLOBAL:
            tot = tl.load(CP + cc, mask=ok, other=0.0)
            n_anchor += tl.where(tot > 1.5, cs + ct, 0.0)
        else:
            tot = cs + ct
            n_anchor += tl.where(tot > 1.5, tot, 0.0)
        n_shared += ((cs > 0.5) & (ct > 0.5)).to(tl.float32)
    return _sum(n_anchor, axis=0), _sum(n_shared, axis=0)


@triton.jit
def _side_labels(YS, YT, side, rl, row_ok):
    """Labels of rows ``rl`` of one side (0: student, 1: teacher), as int32; -1 past the end."""
    is_s = (rl * 0 + side) == 0  # a vector: the interpreter rejects vector & scalar masks
    ys = tl.load(YS + rl, mask=row_ok & is_s, other=-1).to(tl.int32)
    yt = tl.load(YT + rl, mask=row_ok & ~is_s, other=-1).to(tl.int32)
    return tl.where(is_s, ys, yt)


@triton.jit
def _sims_kernel(
    ES, ET, C, YS, YT, X, G, CNT,
    B, M, K, D, NC,
    s_esb, s_esl, s_etb, s_etl, s_ck, s_cd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_KIND: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Grid (row blocks, side, level): sims of one side's rows at one level, and their class sums.

    x = E[:, level] @ C^T with fp32 accumulation, rounded to the working precision and stored to
    X; the per-class sums of the stored x (and, at level 0, the class counts) are added to
    G/CNT with one atomic per class and column, from a one-hot matmul, not one per row.
    """
    pid = tl.program_id(0)
    side = tl.program_id(1)
    level = tl.program_id(2)
    rl = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rl < B
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    # Select the side with tl.where rather than if/else: both branches would have to agree on
    # types, and triton specialises integer arguments equal to 1 into constants.
    e_row = tl.where(side == 0, ES + rl * s_esb + level * s_esl, ET + rl * s_etb + level * s_etl)
    y = _side_labels(YS, YT, side, rl, row_ok)

    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        # The embeddings' last dimension is contiguous (the host makes it so).
        e = tl.load(e_row[:, None] + dd[None, :], mask=row_ok[:, None] & d_ok[None, :])
        ct = tl.load(
            C + kk[None, :] * s_ck + dd[:, None] * s_cd, mask=k_ok[None, :] & d_ok[:, None]
        )
        acc += _mm(e, ct, DOT_KIND, EMULATE)

    rows = side * B + rl
    offs = level * M * K + rows[:, None] * K + kk[None, :]
    tile_ok = row_ok[:, None] & k_ok[None, :]
    x = _to_lo(acc, DOT_KIND, EMULATE)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=tile_ok)
    x = x.to(tl.float32)

    g_base = G + (side * 2 + level) * NC * K
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        onehot = ((y[:, None] == cc[None, :]) & row_ok[:, None]).to(tl.float32)
        # Exact fp32 sums: a 0/1 matrix times fp32 values with "ieee" products.
        sums = tl.dot(tl.trans(onehot), x, input_precision="ieee")
        c_ok = cc < NC
        tl.atomic_add(
            g_base + cc[:, None] * K + kk[None, :], sums, mask=c_ok[:, None] & k_ok[None, :]
        )
        if level == 0:
            tl.atomic_add(CNT + side * NC + cc, _sum(onehot, axis=0), mask=c_ok)


@triton.jit
def _row_class_stats(G, CNT, y, row_ok, level, NC, K, kk, k_ok):
    """For rows of class y: student/teacher class sums at this level and class counts."""
    y_ok = row_ok & (y >= 0) & (y < NC)
    yc = tl.where(y_ok, y, 0)
    m2 = y_ok[:, None] & k_ok[None, :]
    gs = tl.load(G + (level * NC + yc)[:, None] * K + kk[None, :], mask=m2, other=0.0)
    gt = tl.load(G + ((2 + level) * NC + yc)[:, None] * K + kk[None, :], mask=m2, other=0.0)
    cs = tl.load(CNT + yc, mask=y_ok, other=0.0)
    ct = tl.load(CNT + NC + yc, mask=y_ok, other=0.0)
    return gs, gt, cs, ct, y_ok


@triton.jit
def _row_positive_stats(GP, CP, y, row_ok, level, NC, K, kk, k_ok):
    """Global scope: for rows of class y, the positive term's class sums (GP, both sides
    together) at this level and the class counts over every rank (CP)."""
    y_ok = row_ok & (y >= 0) & (y < NC)
    yc = tl.where(y_ok, y, 0)
    m2 = y_ok[:, None] & k_ok[None, :]
    gp = tl.load(GP + (level * NC + yc)[:, None] * K + kk[None, :], mask=m2, other=0.0)
    return gp, tl.load(CP + yc, mask=y_ok, other=0.0), y_ok


@triton.jit
def _prototype(G, CNT, OUT, NC, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """MSE of the class means over classes present on both sides, both levels and all K."""
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    total = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    n_shared = tl.full((BLOCK_C,), 0.0, dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < NC
        cs = tl.load(CNT + cc, mask=c_ok, other=0.0)
        ct = tl.load(CNT + NC + cc, mask=c_ok, other=0.0)
        shared = (cs > 0.5) & (ct > 0.5)
        n_shared += shared.to(tl.float32)
        m2 = shared[:, None] & k_ok[None, :]
        for level in tl.static_range(2):
            gs = tl.load(G + (level * NC + cc)[:, None] * K + kk[None, :], mask=m2, other=0.0)
            gt = tl.load(G + ((2 + level) * NC + cc)[:, None] * K + kk[None, :], mask=m2, other=0.0)
            diff = gs / tl.maximum(cs, 1.0)[:, None] - gt / tl.maximum(ct, 1.0)[:, None]
            total += _sum(tl.where(m2, diff * diff, 0.0), axis=1)
    denom = tl.maximum(_sum(n_shared, axis=0), 1.0) * 2.0 * K
    tl.atomic_add(OUT, _sum(total, axis=0) / denom)


@triton.jit
def _forward_kernel(
    X, YS, YT, G, CNT, GP, CP, LSE, OUT,
    B, M, ROW0, K, NC, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_KIND: tl.constexpr, EMULATE: tl.constexpr,
    GLOBAL: tl.constexpr,
):  # fmt: skip
    """Grid (row blocks, side, level): streaming log-sum-exp of each of this rank's anchors'
    logits over all M candidates k != j (the 2B x M matrix only ever exists as BLOCK_M x BLOCK_N
    tiles), then the anchor's loss ``lse_j - x_j . (GP[y_j] - x_j) / (T n_j)`` (the mean positive
    logit through the class sums GP), summed into OUT[1]. Program (0, 0, 0) also computes the
    prototype term (from this rank's G, CNT)."""
    pid = tl.program_id(0)
    side = tl.program_id(1)
    level = tl.program_id(2)
    rl = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rl < B
    rows = side * B + rl
    if GLOBAL:  # (locally ROW0 is 0: not even an add in the local kernel)
        rows += ROW0
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    x_base = level * M * K
    tile_ok = row_ok[:, None] & k_ok[None, :]
    x_i = tl.load(X + x_base + rows[:, None] * K + kk[None, :], mask=tile_ok, other=0.0)

    # Running max and sum in natural units; exp2 (the native instruction) only ever sees the
    # difference s - m, so logits in the thousands lose no more than one rounding of s - m.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        x_j = tl.load(
            X + x_base + cols[:, None] * K + kk[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        s = _mm(x_i, tl.trans(x_j), DOT_KIND, EMULATE) * inv_t
        keep = col_ok[None, :] & (cols[None, :] != rows[:, None])  # self-pair excluded
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, axis=1))
        # A tile can hold no candidate for a row (only its self pair): keep exp2 away from
        # (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2((m_i - m_safe) * LOG2E) + _sum(
            tl.exp2((s - m_safe[:, None]) * LOG2E), axis=1
        )
        m_i = m_new
    lse = m_i + tl.log(l_i)

    y = _side_labels(YS, YT, side, rl, row_ok)
    if GLOBAL:
        gp, c_all, y_ok = _row_positive_stats(GP, CP, y, row_ok, level, NC, K, kk, k_ok)
        n_pos = c_all - 1.0
    else:
        gs, gt, cs, ct, y_ok = _row_class_stats(G, CNT, y, row_ok, level, NC, K, kk, k_ok)
        n_pos = cs + ct - 1.0
    has_pos = y_ok & (n_pos > 0.5)
    n_anchor, _ = _anchor_stats(CP, CNT, NC, BLOCK_C, GLOBAL)
    x32 = x_i.to(tl.float32)
    if GLOBAL:
        pos = _sum(x32 * (gp - x32), axis=1) * inv_t / tl.maximum(n_pos, 1.0)
    else:
        pos = _sum(x32 * (gs + gt - x32), axis=1) * inv_t / tl.maximum(n_pos, 1.0)
    loss = tl.where(has_pos, lse - pos, 0.0)
    # (L_1 + L_2) / 2 of per-level means over the A anchors that have a positive.
    tl.atomic_add(OUT + 1, _sum(loss, axis=0) * 0.5 / tl.maximum(n_anchor, 1.0))
    lse_adj = tl.where(has_pos, lse + tl.log(tl.maximum(n_anchor, 1.0)), float("inf"))
    tl.store(LSE + level * M + rows, lse_adj, mask=row_ok)

    if (pid == 0) & (side == 0) & (level == 0):
        _prototype(G, CNT, OUT, NC, K, BLOCK_C, BLOCK_K)


@triton.jit
def _contrastive_row_grad(
    X, LSE, x_i, rows, row_ok, level, M, K, inv_t, kk, k_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_KIND: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """sum_k (P_ik + P_ki) x_k over k != i, with P_jk = w_j softmax_j(k) recomputed tile by tile
    from the stored LSE. The logits are symmetric (s_ik = s_ki), so one tile of s serves both the
    row's own softmax (P_ik) and row i's place in every other anchor's softmax (P_ki)."""
    lse_i = tl.load(LSE + level * M + rows, mask=row_ok, other=float("inf"))
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        x_j = tl.load(
            X + level * M * K + cols[:, None] * K + kk[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        lse_j = tl.load(LSE + level * M + cols, mask=col_ok, other=float("inf"))
        s = _mm(x_i, tl.trans(x_j), DOT_KIND, EMULATE) * inv_t
        keep = col_ok[None, :] & (cols[None, :] != rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        p = tl.exp2((s - lse_i[:, None]) * LOG2E) + tl.exp2((s - lse_j[None, :]) * LOG2E)
        acc += _mm(p, x_j, DOT_KIND, EMULATE)
    return acc


@triton.jit
def _backward_kernel(
    X, YS, G, CNT, GP, CP, LSE, C, DE, DX, GRAD,
    B, M, ROW0, K, D, NC, inv_t,
    s_deb, s_del, s_ded, s_ck, s_cd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_KIND: tl.constexpr,
    EMULATE: tl.constexpr, STORE_DX: tl.constexpr, GLOBAL: tl.constexpr,
):  # fmt: skip
    """Grid (student row blocks, level): d(loss)/d(sims) of the student rows, then
    d(loss)/d(embedding) = dx @ C straight from registers. Teacher rows are constants.

    With w = 1/A for anchors with a positive (else 0), c_i = w_i / (T n_i), Ga[c] the class sums
    over all candidates and G[c] over this rank's anchors (GP = Ga + G, globally):
      d L_l / d x_i = (1/T) sum_k (P_ik + P_ki) x_k - c_i ((Ga[y_i] - x_i) + (G[y_i] - x_i))
    (the positive part: x_i appears in its own positive sum and, with the same c, in those of
    its positives that are this rank's anchors; locally Ga = G). P_ki is 0 for other ranks'
    anchors (their LSE is +inf). L_con = (L_1 + L_2) / 2. The prototype term adds, for a class
    shared by both sides, 2 (P_f[c] - P_o[c]) / (count_f[c] * n_shared * 2K).
    """
    pid = tl.program_id(0)
    level = tl.program_id(1)
    rl = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rl < B
    rows = rl  # this rank's student rows are rows ROW0..ROW0+B-1 of X
    if GLOBAL:
        rows += ROW0
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    tile_ok = row_ok[:, None] & k_ok[None, :]
    x_off = level * M * K + rows[:, None] * K + kk[None, :]
    x_i = tl.load(X + x_off, mask=tile_ok, other=0.0)
    acc = _contrastive_row_grad(
        X, LSE, x_i, rows, row_ok, level, M, K, inv_t, kk, k_ok,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_KIND, EMULATE,
    )  # fmt: skip

    g_proto = tl.load(GRAD)
    g_con = tl.load(GRAD + 1)
    y = tl.load(YS + rl, mask=row_ok, other=-1).to(tl.int32)
    # The order of the local code is as it was before the global scope (same registers).
    if GLOBAL:
        gp, c_all, y_ok = _row_positive_stats(GP, CP, y, row_ok, level, NC, K, kk, k_ok)
    else:
        gs, gt, cs, ct, y_ok = _row_class_stats(G, CNT, y, row_ok, level, NC, K, kk, k_ok)
    n_anchor, n_shared = _anchor_stats(CP, CNT, NC, BLOCK_C, GLOBAL)
    n_pos = (c_all if GLOBAL else cs + ct) - 1.0
    c_i = tl.where(
        y_ok & (n_pos > 0.5), inv_t / (tl.maximum(n_anchor, 1.0) * tl.maximum(n_pos, 1.0)), 0.0
    )
    x32 = x_i.to(tl.float32)
    if GLOBAL:
        # One tile for both positive parts; this rank's own sums are loaded after it, for the
        # prototype (two more tiles live only once acc is spent).
        dx = (0.5 * inv_t * g_con) * acc - (0.5 * g_con * c_i)[:, None] * (gp - 2.0 * x32)
        gs, gt, cs, ct, y_ok = _row_class_stats(G, CNT, y, row_ok, level, NC, K, kk, k_ok)
    else:  # both positive parts are the same
        dx = (0.5 * inv_t * g_con) * acc - (g_con * c_i)[:, None] * (gs + gt - x32)
    shared = y_ok & (cs > 0.5) & (ct > 0.5)
    coef = tl.where(shared, g_proto / (tl.maximum(cs, 1.0) * tl.maximum(n_shared, 1.0) * K), 0.0)
    dx += coef[:, None] * (gs / tl.maximum(cs, 1.0)[:, None] - gt / tl.maximum(ct, 1.0)[:, None])
    dx = tl.where(tile_ok, dx, 0.0)
    if STORE_DX:
        # DX is [2 levels, B student rows, K].
        tl.store(DX + level * B * K + rl[:, None] * K + kk[None, :], dx, mask=tile_ok)

    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        c = tl.load(
            C + kk[:, None] * s_ck + dd[None, :] * s_cd, mask=k_ok[:, None] & d_ok[None, :]
        ).to(tl.float32)
        if DOT_KIND == 0:
            de = tl.dot(dx, c, input_precision="ieee")
        else:
            # TF32 keeps fp32's exponent range: the gradients can be far below fp16's.
            de = tl.dot(dx, c, input_precision="tf32")
        tl.store(
            DE + rl[:, None] * s_deb + level * s_del + dd[None, :] * s_ded,
            _to_lo(de, DOT_KIND, EMULATE).to(DE.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
