"""Tests for multieye_dist.model.losses.

Every term is checked against an independent float64 brute-force reference written with Python
loops and math.exp/log (no vectorised torch), and the "official" variant against a separate
re-statement of the released training step (xmed-lab/MultiEYE process/finetune.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks

from multieye_dist.model import losses as L
from multieye_dist.model.losses import (
    LossOutput,
    contrastive_loss,
    distillation_gate,
    fundus_only_loss,
    gate_distances,
    octcoda_loss,
    prototype_loss,
    supcon_loss,
)

C = 9  # classes
T = 10.0  # release temperature
SEEDS = [11, 223, 3607, 48611]
VARIANTS = ["paper", "official"]


# ----------------------------------------------------------------------------- inputs


def gate(zf: torch.Tensor, zo: torch.Tensor, y: torch.Tensor) -> bool:
    """The batch gate as octcoda_loss decides it, read to the host."""
    return bool(distillation_gate(zf, zo, y))


def val(t: torch.Tensor) -> float:
    return t.detach().item()


def make_batch(
    seed: int, b: int = 6, k: int = 5, dtype: torch.dtype = torch.float64, n_labels: int = C
) -> dict[str, torch.Tensor]:
    """Random student/teacher tensors; labels drawn from the first ``n_labels`` classes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "student_logits": torch.randn(b, C, generator=g, dtype=dtype) * 2,
        "student_sims": torch.randn(b, 2, k, generator=g, dtype=dtype),
        "student_labels": torch.randint(0, n_labels, (b,), generator=g),
        "teacher_logits": torch.randn(b, C, generator=g, dtype=dtype) * 2,
        "teacher_sims": torch.randn(b, 2, k, generator=g, dtype=dtype),
        "teacher_labels": torch.randint(0, n_labels, (b,), generator=g),
    }


def disjoint_error_logits(
    labels: torch.Tensor, true_logit: float, wrong_shift: int, wrong_logit: float = 0.0
) -> torch.Tensor:
    """Logits with mass only on the true class and on class (y + wrong_shift) % C."""
    z = torch.full((labels.shape[0], C), -30.0, dtype=torch.float64)
    rows = torch.arange(labels.shape[0])
    z[rows, labels] = true_logit
    z[rows, (labels + wrong_shift) % C] = wrong_logit
    return z


def open_gate_logits(yf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits for which the gate must open.

    Student: p(true) = 1/(1+e^2) ~ 0.12, rest on class y+1. Teacher: p(true) = e^4/(1+e^4) ~ 0.98,
    rest on class y+2. The wrong-class supports are disjoint, so per sample
    |p_t - p_s|_1 = (p_t,c - p_s,c) + (1 - p_t,c) + (1 - p_s,c) = 2 (1 - p_s,c) = |p_s - y|_1, i.e.
    d_st = d_s ~ 1.76, while d_t ~ 0.036 < d_s and delta = d_s - eps d_t ~ d_s - 0.035 < d_st.
    """
    return disjoint_error_logits(yf, 0.0, 1, 2.0), disjoint_error_logits(yf, 4.0, 2)


# ----------------------------------------------------------------------------- brute force


def ref_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = math.fsum(e)
    return [v / s for v in e]


def ref_gate(zf: torch.Tensor, zo: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
    """(d_s, d_t, d_st, delta, open) with loops; teacher scored against ``y``."""
    d_s = d_t = d_st = 0.0
    n = zf.shape[0]
    for zs_row, zt_row, yi in zip(zf.tolist(), zo.tolist(), y.tolist(), strict=True):
        ps, pt = ref_softmax(zs_row), ref_softmax(zt_row)
        onehot = [1.0 if c == yi else 0.0 for c in range(len(ps))]
        d_s += math.fsum(abs(a - b) for a, b in zip(ps, onehot, strict=True)) / n
        d_t += math.fsum(abs(a - b) for a, b in zip(pt, onehot, strict=True)) / n
        d_st += math.fsum(abs(a - b) for a, b in zip(pt, ps, strict=True)) / n
    eps = math.exp(-d_t / (d_s + d_t))
    delta = d_s - eps * d_t
    return d_s, d_t, d_st, delta, float(d_st > delta and d_t < d_s)


def ref_prototype(sf: torch.Tensor, yf: torch.Tensor, so: torch.Tensor, yo: torch.Tensor) -> float:
    s_f, s_o, l_f, l_o = sf.tolist(), so.tolist(), yf.tolist(), yo.tolist()
    shared = sorted(set(l_f) & set(l_o))
    levels, k = len(s_f[0]), len(s_f[0][0])
    acc = []
    for c in shared:
        rows_f = [s for s, lab in zip(s_f, l_f, strict=True) if lab == c]
        rows_o = [s for s, lab in zip(s_o, l_o, strict=True) if lab == c]
        for lev in range(levels):
            for j in range(k):
                mean_f = math.fsum(r[lev][j] for r in rows_f) / len(rows_f)
                mean_o = math.fsum(r[lev][j] for r in rows_o) / len(rows_o)
                acc.append((mean_f - mean_o) ** 2)
    return math.fsum(acc) / len(acc) if acc else 0.0


def ref_supcon(
    feats: list[list[float]], labels: list[int], temp: float, anchors: range, no_positive: str
) -> float:
    terms = []
    for j in anchors:
        logit = {
            k: math.fsum(a * b for a, b in zip(feats[j], feats[k], strict=True)) / temp
            for k in range(len(feats))
            if k != j
        }
        log_denom = math.log(math.fsum(math.exp(v) for v in logit.values()))
        positives = [k for k in logit if labels[k] == labels[j]]
        if not positives:
            if no_positive == "nan":
                return math.nan
            continue
        terms.append(math.fsum(logit[k] - log_denom for k in positives) / len(positives))
    return -math.fsum(terms) / len(terms) if terms else 0.0


def anchor_rows(
    sf: torch.Tensor, so: torch.Tensor, yf: torch.Tensor, yo: torch.Tensor, variant: str
) -> tuple[list[list[list[float]]], list[int]]:
    """Per level: the 2B anchor vectors (students then teachers); and their labels."""
    teacher_labels = yf if variant == "official" else yo
    feats = [sf[:, lev].tolist() + so[:, lev].tolist() for lev in range(sf.shape[1])]
    return feats, yf.tolist() + teacher_labels.tolist()


def ref_contrastive(sf, so, yf, yo, variant: str, temp: float = T) -> float:
    feats, labels = anchor_rows(sf, so, yf, yo, variant)
    mode = "nan" if variant == "official" else "skip"
    per_level = [ref_supcon(f, labels, temp, range(len(f)), mode) for f in feats]
    return math.fsum(per_level) / len(per_level)


def ref_total(batch: dict, variant: str, alpha: float, beta: float) -> tuple[float, ...]:
    zf, yf = batch["student_logits"], batch["student_labels"]
    cls = math.fsum(
        -(row[y] - max(row) - math.log(math.fsum(math.exp(v - max(row)) for v in row)))
        for row, y in zip(zf.tolist(), yf.tolist(), strict=True)
    ) / len(yf)
    is_open = ref_gate(zf, batch["teacher_logits"], yf)[-1]
    args = (batch["student_sims"], yf, batch["teacher_sims"], batch["teacher_labels"])
    proto = ref_prototype(*args)
    con = ref_contrastive(args[0], args[2], yf, args[3], variant)
    distill = beta * proto + alpha * con
    total = cls + is_open * distill if math.isfinite(distill) else cls
    return total, cls, proto, con, is_open


# ----------------------------------------------------------------------------- the release


def release_step(zf, sf, yf, zo, so, yo, alpha: float, beta: float, temp: float):
    """Independent re-statement of the released step's student loss (process/finetune.py).

    What it computes: CE; the SwitOKD gate with temperature-1 softmaxes and the teacher scored
    against the fundus one-hot; prototypes from DETACHED student sims over the set intersection
    of labels, nn.MSELoss-style mean; SupCon over both views with the fundus labels repeated
    for the teacher rows, shifted by the row max *including* the self pair, NaN for an anchor
    without positives; -alpha/2 per level, mean over the 2B anchors; NaN distillation dropped.
    Returns (total, beta*proto or None, alpha*con or None, gate).
    """
    n, n_cls = zf.shape
    cls = F.cross_entropy(zf, yf)
    target = torch.zeros(n, n_cls, dtype=zf.dtype).scatter(1, yf[:, None], 1.0)
    p_s, p_t = torch.softmax(zf.detach(), -1), torch.softmax(zo.detach(), -1)
    s_label = (p_s - target).abs().sum(1).mean()
    t_label = (p_t - target).abs().sum(1).mean()
    s_t = (p_t - p_s).abs().sum(1).mean()
    threshold = s_label - torch.exp(-t_label / (s_label + t_label)) * t_label
    if not (s_t > threshold and t_label < s_label):
        return cls, None, None, False
    common = sorted(set(yf.tolist()) & set(yo.tolist()))
    f_proto = torch.stack([sf.detach()[yf == c].mean(0) for c in common])
    o_proto = torch.stack([so.detach()[yo == c].mean(0) for c in common])
    proto = F.mse_loss(f_proto, o_proto) * beta
    views = torch.cat([sf, so.detach()], 0)
    lab = torch.cat([yf, yf])
    not_self = 1.0 - torch.eye(2 * n, dtype=zf.dtype)
    pos = (lab[:, None] == lab[None, :]).to(zf.dtype) * not_self
    per_anchor = torch.zeros(2 * n, dtype=zf.dtype)
    for level in range(2):
        x = views[:, level]
        z = x @ x.T / temp
        z = z - z.max(1, keepdim=True).values.detach()
        logp = z - torch.log((torch.exp(z) * not_self).sum(1, keepdim=True))
        per_anchor = per_anchor - 0.5 * alpha * (pos * logp).sum(1) / pos.sum(1)
    con = per_anchor.mean()
    distill = proto + con
    return (cls if torch.isnan(distill) else cls + distill), proto, con, True


# ----------------------------------------------------------------------------- gate


@pytest.mark.parametrize("seed", range(12))
def test_gate_matches_reference(seed: int) -> None:
    b = make_batch(seed, b=1 + seed % 7)
    zf, zo, yf = b["student_logits"], b["teacher_logits"], b["student_labels"]
    d_s, d_t, d_st, delta, is_open = ref_gate(zf, zo, yf)
    got = torch.stack(gate_distances(zf, zo, yf)).tolist()
    assert got == pytest.approx([d_s, d_t, d_st], abs=1e-12)
    assert abs(d_st - delta) > 1e-9  # not a tie, so the decision below is meaningful
    assert gate(zf, zo, yf) is bool(is_open)
    assert bool(octcoda_loss(**b).gated) is bool(is_open)


def test_gate_closed_when_student_uniform() -> None:
    # Student uniform (p = 1/9), teacher p(true) = q > 1/9 and (1-q)/8 < 1/9 elsewhere:
    # d_s = 16/9, d_t = 2(1-q), d_st = (q - 1/9) + 8 (1/9 - (1-q)/8) = d_s - d_t,
    # delta = d_s - eps d_t > d_s - d_t because eps < 1. So d_st < delta: closed.
    y = torch.tensor([0, 3, 8, 5])
    zf = torch.zeros(4, C, dtype=torch.float64)
    zo = disjoint_error_logits(y, 4.0, 1).clamp(min=0.0)  # 4 on the true class, 0 elsewhere
    d_s, d_t, d_st = (float(v) for v in gate_distances(zf, zo, y))
    assert d_s == pytest.approx(16 / 9, abs=1e-12)
    assert d_st == pytest.approx(d_s - d_t, abs=1e-12)
    assert gate(zf, zo, y) is False


def test_gate_closed_when_teacher_worse() -> None:
    # Teacher uniform: d_t = 16/9; student logit 5 on the truth: d_s = 2 * 8/(e^5+8) ~ 0.1 < d_t.
    y = torch.tensor([1, 2, 2, 7, 0])
    zf = disjoint_error_logits(y, 5.0, 1).clamp(min=0.0)
    zo = torch.zeros(5, C, dtype=torch.float64)
    d_s, d_t, _ = (float(v) for v in gate_distances(zf, zo, y))
    assert d_s == pytest.approx(16 / (math.exp(5) + 8), rel=1e-12)
    assert d_t > d_s
    assert gate(zf, zo, y) is False


def test_gate_opens_when_errors_disjoint() -> None:
    y = torch.tensor([0, 4, 6, 6, 8, 1])
    zf, zo = open_gate_logits(y)
    d_s, d_t, d_st, delta, _ = ref_gate(zf, zo, y)
    assert d_st == pytest.approx(d_s, abs=1e-10)  # derived in open_gate_logits' docstring
    assert d_t < d_s and d_st - delta > 0.03
    assert gate(zf, zo, y) is True


def test_gate_scores_teacher_against_fundus_labels() -> None:
    yf = torch.tensor([0, 4, 6, 2])
    yo = (yf + 2) % C
    zf = disjoint_error_logits(yf, 0.0, 1, 2.0)
    zo = disjoint_error_logits(yo, 4.0, 1)  # confident and right about yo, wrong about yf
    assert ref_gate(zf, zo, yo)[-1] == 1.0  # scored against yo it would open ...
    assert ref_gate(zf, zo, yf)[-1] == 0.0  # ... against the fundus labels it must not
    assert gate(zf, zo, yf) is False
    batch = make_batch(0, b=4)
    batch.update(student_logits=zf, teacher_logits=zo, student_labels=yf, teacher_labels=yo)
    assert bool(octcoda_loss(**batch).gated) is False


# ----------------------------------------------------------------------------- terms vs brute force


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_prototype_matches_reference(seed: int, variant: str) -> None:
    b = make_batch(seed, b=10, n_labels=4)
    args = (b["student_sims"], b["student_labels"], b["teacher_sims"], b["teacher_labels"])
    got = prototype_loss(*args, C, variant=variant)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(ref_prototype(*args), rel=1e-12, abs=1e-14)
    assert float(octcoda_loss(**b, variant=variant).prototype) == pytest.approx(float(got))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_contrastive_matches_reference(seed: int, variant: str) -> None:
    b = make_batch(seed, b=7, n_labels=3)
    sf, so, yf, yo = (
        b[k] for k in ("student_sims", "teacher_sims", "student_labels", "teacher_labels")
    )
    want = ref_contrastive(sf, so, yf, yo, variant)
    got = contrastive_loss(sf, so, yf, yo, temperature=T, variant=variant)
    assert float(got) == pytest.approx(want, rel=1e-12)
    assert float(octcoda_loss(**b, variant=variant).contrastive) == pytest.approx(want, rel=1e-12)
    # The variants differ exactly in the teacher anchors' labels; make sure that matters here.
    other = "paper" if variant == "official" else "official"
    assert abs(ref_contrastive(sf, so, yf, yo, other) - want) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("force_open", [False, True])
def test_total_matches_reference(seed: int, variant: str, force_open: bool) -> None:
    b = make_batch(seed, b=8, n_labels=5)
    if force_open:
        b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    # Distinct weights, so swapping alpha and beta would fail.
    alpha, beta = 0.7, 0.2
    total, cls, proto, con, is_open = ref_total(b, variant, alpha, beta)
    out = octcoda_loss(**b, alpha=alpha, beta=beta, temperature=T, variant=variant)
    assert isinstance(out, LossOutput)
    assert bool(out.gated) is bool(is_open)
    if force_open:
        assert out.gated
    got = [float(v) for v in (out.total, out.cls, out.prototype, out.contrastive)]
    assert got == pytest.approx([total, cls, proto, con], rel=1e-12)
    if out.gated:
        assert val(out.total - out.cls) == pytest.approx(beta * proto + alpha * con, rel=1e-10)


# ----------------------------------------------------------------------------- release


def paired_batch(seed: int, b: int = 8, k: int = 6) -> dict[str, torch.Tensor]:
    """Like the release's loader: OCT partner i has the fundus label i (mostly)."""
    batch = make_batch(seed, b=b, k=k, n_labels=4)
    yo = batch["student_labels"].clone()
    yo[0] = (yo[0] + 1) % C  # one partner from a class without OCT images
    batch["teacher_labels"] = yo
    return batch


@pytest.mark.parametrize("force_open", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_official_matches_release_restatement(seed: int, force_open: bool) -> None:
    b = paired_batch(seed)
    if force_open:
        b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    alpha, beta = 0.6, 0.05
    zf = b["student_logits"].clone().requires_grad_(True)
    sf = b["student_sims"].clone().requires_grad_(True)
    rest = (b["teacher_logits"], b["teacher_sims"], b["teacher_labels"])
    out = octcoda_loss(zf, sf, b["student_labels"], *rest, variant="official", alpha=alpha)
    zf2, sf2 = zf.detach().clone().requires_grad_(True), sf.detach().clone().requires_grad_(True)
    total, proto, con, opened = release_step(
        zf2, sf2, b["student_labels"], *rest, alpha=alpha, beta=beta, temp=T
    )
    assert bool(out.gated) is opened
    assert val(out.total) == pytest.approx(val(total), rel=1e-12)
    if opened:
        assert val(beta * out.prototype) == pytest.approx(val(proto), rel=1e-12)
        assert val(alpha * out.contrastive) == pytest.approx(val(con), rel=1e-12)
    out.total.backward()
    total.backward()
    torch.testing.assert_close(zf.grad, zf2.grad, rtol=1e-10, atol=1e-12)
    want_sf = sf2.grad if sf2.grad is not None else torch.zeros_like(sf)
    torch.testing.assert_close(sf.grad, want_sf, rtol=1e-10, atol=1e-12)


def test_official_prototype_has_no_gradient() -> None:
    b = paired_batch(5)
    b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    grads = {}
    for variant in VARIANTS:
        sf = b["student_sims"].clone().requires_grad_(True)
        out = octcoda_loss(**{**b, "student_sims": sf}, alpha=0.0, beta=1.0, variant=variant)
        assert out.gated and val(out.prototype) > 0
        out.total.backward()
        grads[variant] = sf.grad
    assert torch.count_nonzero(grads["official"]) == 0
    assert grads["paper"].abs().max() > 1e-4
    # With alpha > 0 the official sims gradient is exactly alpha * d(contrastive).
    sf = b["student_sims"].clone().requires_grad_(True)
    octcoda_loss(**{**b, "student_sims": sf}, alpha=0.6, variant="official").total.backward()
    sf_c = b["student_sims"].clone().requires_grad_(True)
    args = (b["teacher_sims"], b["student_labels"], b["teacher_labels"])
    (0.6 * contrastive_loss(sf_c, *args, variant="official")).backward()
    torch.testing.assert_close(sf.grad, sf_c.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_gets_no_gradient(variant: str) -> None:
    b = paired_batch(8)
    b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    teacher = {k: b[k].clone().requires_grad_(True) for k in ("teacher_logits", "teacher_sims")}
    sf = b["student_sims"].clone().requires_grad_(True)
    out = octcoda_loss(**{**b, **teacher, "student_sims": sf}, variant=variant)
    assert out.gated
    out.total.backward()
    assert all(t.grad is None for t in teacher.values())
    assert sf.grad.abs().max() > 0


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_paper_total_with_open_gate() -> None:
    yf = torch.tensor([0, 2, 2, 5])
    yo = torch.tensor([2, 0, 5, 5])
    zf, zo = open_gate_logits(yf)
    g = torch.Generator().manual_seed(7)
    sf = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    so = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    zf = zf.clone().requires_grad_(True)

    def fn(logits: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        out = octcoda_loss(logits, sims, yf, zo, so, yo, alpha=0.6, beta=0.5, variant="paper")
        assert out.gated
        return out.total

    assert torch.autograd.gradcheck(fn, (zf, sf))


def test_gradcheck_terms() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 0, 3])  # class 2 and 3 anchors have no positive
    assert torch.autograd.gradcheck(lambda f: supcon_loss(f, labels, 0.5), (x,))
    sims = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    so = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    yf, yo = torch.tensor([0, 1, 1, 4, 0]), torch.tensor([1, 1, 0, 3])
    assert torch.autograd.gradcheck(lambda s: prototype_loss(s, yf, so, yo, C), (sims,))


# ----------------------------------------------------------------------------- corner cases


def test_prototype_uses_shared_classes_only() -> None:
    g = torch.Generator().manual_seed(1)
    sf = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    so = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    yf, yo = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 1, 3, 3])
    # Only class 1 is on both sides: student prototype sf[2], teacher mean(so[0], so[1]).
    want = ((sf[2] - (so[0] + so[1]) / 2) ** 2).mean()
    for variant in VARIANTS:
        assert float(prototype_loss(sf, yf, so, yo, C, variant=variant)) == pytest.approx(
            float(want), rel=1e-12
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_shared_class_gives_zero_prototype(variant: str) -> None:
    b = make_batch(2, b=6, n_labels=2)  # labels in {0, 1}
    b["teacher_labels"] = b["teacher_labels"] + 2  # labels in {2, 3}
    b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    sf = b["student_sims"].clone().requires_grad_(True)
    out = octcoda_loss(**{**b, "student_sims": sf}, variant=variant)
    assert out.gated and val(out.prototype) == 0.0
    assert torch.isfinite(out.total) and torch.isfinite(out.contrastive)
    out.total.backward()
    assert torch.isfinite(sf.grad).all() and sf.grad.abs().max() > 0  # contrastive still acts


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_class_batch(variant: str) -> None:
    b = make_batch(4, b=5, n_labels=1)  # every label is 0 on both sides
    args = (b["student_sims"], b["student_labels"], b["teacher_sims"], b["teacher_labels"])
    out = octcoda_loss(**b, variant=variant)
    assert val(out.prototype) == pytest.approx(ref_prototype(*args), rel=1e-12)
    assert val(out.contrastive) == pytest.approx(
        ref_contrastive(args[0], args[2], args[1], args[3], variant), rel=1e-12
    )
    assert math.isfinite(val(out.total))


def test_paper_variant_never_nan_on_random_batches() -> None:
    for seed in range(60):
        b = make_batch(1000 + seed, b=1 + seed % 6, dtype=torch.float32)  # many singletons
        sf = b["student_sims"].clone().requires_grad_(True)
        zf = b["student_logits"].clone().requires_grad_(True)
        out = octcoda_loss(**{**b, "student_sims": sf, "student_logits": zf})
        for v in (out.total, out.prototype, out.contrastive):
            assert torch.isfinite(v), (seed, out)
        out.total.backward()
        assert torch.isfinite(sf.grad).all() and torch.isfinite(zf.grad).all()


def test_paper_contrastive_without_any_positive_is_zero() -> None:
    # Four distinct anchor labels (paper: cat(y_f, y_o)): no anchor has a positive, so the mean is
    # over nothing and the term is 0. Official labels cat(y_f, y_f) give each anchor its partner
    # as the one positive among 3 candidates: -log softmax(partner) > 0.
    b = make_batch(9, b=2)
    b["student_labels"], b["teacher_labels"] = torch.tensor([1, 2]), torch.tensor([3, 4])
    assert float(octcoda_loss(**b).contrastive) == 0.0
    assert float(octcoda_loss(**b, variant="official").contrastive) > 0


def test_supcon_nan_for_anchor_without_positive() -> None:
    g = torch.Generator().manual_seed(19)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2])  # anchor 4 has no positive
    assert math.isnan(val(supcon_loss(x, labels, T, no_positive="nan")))
    skip = supcon_loss(x, labels, T, no_positive="skip")
    assert val(skip) == pytest.approx(ref_supcon(x.tolist(), labels.tolist(), T, range(5), "skip"))
    supcon_loss(x, labels, T, no_positive="nan").backward()
    assert torch.isfinite(x.grad).all()  # the NaN is a constant, not a NaN gradient


def test_official_pairing_always_gives_a_positive() -> None:
    # cat(y_f, y_f): anchor i and its teacher partner B+i share a label, so even all-distinct
    # labels leave every anchor one positive; the official contrastive is finite.
    b = make_batch(8, b=C)
    b["student_labels"] = torch.randperm(C, generator=torch.Generator().manual_seed(0))
    out = octcoda_loss(**b, variant="official")
    assert torch.isfinite(out.contrastive)


def test_nan_distillation_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    b = paired_batch(6)
    b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    real = L.contrastive_loss
    # What the release's 0/0 for an anchor without positive would produce.
    monkeypatch.setattr(L, "contrastive_loss", lambda *a, **k: real(*a, **k) * math.nan)
    zf = b["student_logits"].clone().requires_grad_(True)
    out = octcoda_loss(**{**b, "student_logits": zf}, variant="official")
    assert out.gated and math.isnan(val(out.contrastive))
    assert val(out.total) == val(out.cls)
    out.total.backward()
    assert torch.isfinite(zf.grad).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_overflowing_sims_are_dropped(variant: str) -> None:
    b = paired_batch(6)
    b["student_logits"], b["teacher_logits"] = open_gate_logits(b["student_labels"])
    b = {k: v.float() if v.is_floating_point() else v for k, v in b.items()}
    b["student_sims"] = b["student_sims"] * 1e25  # x.x / T overflows float32
    sf = b["student_sims"].clone().requires_grad_(True)
    out = octcoda_loss(**{**b, "student_sims": sf}, variant=variant)
    assert out.gated and not torch.isfinite(out.contrastive)
    assert val(out.total) == val(out.cls)
    out.total.backward()  # the dropped term sends no NaN back through the graph either
    assert torch.isfinite(sf.grad).all() and sf.grad.abs().max() == 0


def test_closed_gate_total_equals_cls_but_keeps_graph() -> None:
    b = make_batch(3, b=4)
    y = b["student_labels"]
    b["student_logits"] = torch.zeros(4, C, dtype=torch.float64)  # closed: see uniform test
    b["teacher_logits"] = disjoint_error_logits(y, 4.0, 1).clamp(min=0.0)
    sf = b["student_sims"].clone().requires_grad_(True)
    out = octcoda_loss(**{**b, "student_sims": sf})
    assert bool(out.gated) is False
    assert val(out.total) == val(out.cls)
    assert val(out.contrastive) > 0 and val(out.prototype) > 0  # still reported
    out.total.backward()
    assert sf.grad is not None and torch.count_nonzero(sf.grad) == 0


# ----------------------------------------------------------------------------- validation


BAD_INPUTS = [
    (
        "student_logits",
        lambda t: t[:, 0],
        ValueError,
        r"student_logits must be of shape \[B, num_classes\].*\(6,\)",
    ),
    (
        "teacher_logits",
        lambda t: t[:, :1],
        ValueError,
        r"teacher_logits needs at least 2 classes",
    ),
    (
        "student_sims",
        lambda t: t[:, 0],
        ValueError,
        r"student_sims must be of shape \[B, 2, K\].*\(6, 5\)",
    ),
    (
        "teacher_sims",
        lambda t: t.repeat(1, 2, 1),
        ValueError,
        r"teacher_sims must be of shape \[B, 2, K\].*\(6, 4, 5\)",
    ),
    (
        "teacher_sims",
        lambda t: t[..., :4],
        ValueError,
        r"disagree on K",
    ),
    (
        "student_sims",
        lambda t: t[:5],
        ValueError,
        r"student_sims batch 5 != student_logits batch 6",
    ),
    (
        "teacher_logits",
        lambda t: t[:5],
        ValueError,
        r"teacher batch must equal student batch.*pairs",
    ),
    (
        "teacher_logits",
        lambda t: t[:, :8],
        ValueError,
        r"disagree on the number of classes",
    ),
    (
        "student_labels",
        lambda t: t[:4],
        ValueError,
        r"student_labels must be of shape \[B\] with B=6.*\(4,\)",
    ),
    (
        "student_labels",
        lambda t: t.float(),
        TypeError,
        r"student_labels must have an integer dtype.*float32",
    ),
    (
        "teacher_labels",
        lambda t: t > 3,
        TypeError,
        r"teacher_labels must have an integer dtype.*bool",
    ),
    (
        "teacher_labels",
        lambda t: t + C,
        ValueError,
        r"teacher_labels must lie in \[0, 9\)",
    ),
    (
        "student_labels",
        lambda t: t - 20,
        ValueError,
        r"student_labels must lie in \[0, 9\)",
    ),
    (
        "student_sims",
        lambda t: t.long(),
        TypeError,
        r"student_sims must be a floating tensor",
    ),
    (
        "teacher_logits",
        lambda t: t.tolist(),
        TypeError,
        r"teacher_logits must be a torch.Tensor.*list",
    ),
]


@pytest.mark.parametrize(("key", "mutate", "exc", "match"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(key, mutate, exc, match) -> None:
    b = make_batch(0, b=6, k=5)
    b[key] = mutate(b[key])
    with pytest.raises(exc, match=match):
        octcoda_loss(**b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "paperr"}, r"unknown variant 'paperr'"),
        ({"contrastive_scope": "world"}, r"unknown contrastive_scope 'world'"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        octcoda_loss(**make_batch(0), **kwargs)


# ----------------------------------------------------------------------------- other losses, dtypes


def test_fundus_only_equals_cross_entropy() -> None:
    b = make_batch(12, dtype=torch.float32)
    out = fundus_only_loss(b["student_logits"], b["student_labels"])
    want = F.cross_entropy(b["student_logits"], b["student_labels"])
    assert torch.equal(out.total, want) and torch.equal(out.cls, want)
    assert val(out.prototype) == 0.0 and val(out.contrastive) == 0.0 and bool(out.gated) is False
    with pytest.raises(ValueError, match=r"student_labels must lie in \[0, 9\)"):
        fundus_only_loss(b["student_logits"], b["student_labels"] + C)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    b = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_batch(14).items()}
    out = octcoda_loss(**b)
    as32 = octcoda_loss(**{k: v.float() if v.is_floating_point() else v for k, v in b.items()})
    for got, want in zip(
        (out.total, out.cls, out.prototype, out.contrastive),
        (as32.total, as32.cls, as32.prototype, as32.contrastive),
        strict=True,
    ):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)  # same upcast values, same float32 arithmetic


def test_autocast_does_not_lower_precision() -> None:
    b = {k: v.float() if v.is_floating_point() else v for k, v in make_batch(15).items()}
    plain = octcoda_loss(**b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = octcoda_loss(**b)
    assert inside.contrastive.dtype == torch.float32
    assert torch.equal(inside.total, plain.total)


def test_float64_stays_float64() -> None:
    out = octcoda_loss(**make_batch(16))
    assert all(t.dtype == torch.float64 for t in (out.total, out.cls, out.contrastive))


# ----------------------------------------------------------------------------- global scope


@pytest.mark.parametrize("variant", VARIANTS)
def test_global_scope_equals_local_without_process_group(variant: str) -> None:
    assert not torch.distributed.is_initialized()
    b = make_batch(17, n_labels=4)
    local = octcoda_loss(**b, variant=variant, contrastive_scope="local")
    glob = octcoda_loss(**b, variant=variant, contrastive_scope="global")
    assert torch.equal(local.total, glob.total) and torch.equal(local.contrastive, glob.contrastive)


def _rank_batches(seed: int, world: int) -> list[dict[str, torch.Tensor]]:
    # Ragged: rank r has 3 + r samples, so the gather must handle unequal sizes.
    return [make_batch(seed + r, b=3 + r, k=4, n_labels=4) for r in range(world)]


def _global_reference(batches: list[dict], rank: int, variant: str, sf_local=None) -> float:
    """Brute force over every rank's anchors; j ranges over ``rank``'s anchors only."""
    feats: list[list[list[float]]] = [[], []]
    labels: list[int] = []
    start = 0
    for r, b in enumerate(batches):
        sf = sf_local if (r == rank and sf_local is not None) else b["student_sims"]
        f, lab = anchor_rows(
            sf, b["teacher_sims"], b["student_labels"], b["teacher_labels"], variant
        )
        if r < rank:
            start += len(lab)
        feats[0] += f[0]
        feats[1] += f[1]
        labels += lab
    n_local = 2 * batches[rank]["student_labels"].shape[0]
    mode = "nan" if variant == "official" else "skip"
    anchors = range(start, start + n_local)
    return math.fsum(ref_supcon(f, labels, T, anchors, mode) for f in feats) / 2


def _global_worker(rank: int, world: int, seed: int) -> None:
    batches = _rank_batches(seed, world)
    for variant in VARIANTS:
        b = dict(batches[rank])
        sf = b["student_sims"].clone().requires_grad_(True)
        so = b["teacher_sims"].clone().requires_grad_(True)
        out = octcoda_loss(
            **{**b, "student_sims": sf, "teacher_sims": so},
            variant=variant,
            contrastive_scope="global",
        )
        want = _global_reference(batches, rank, variant)
        assert val(out.contrastive) == pytest.approx(want, rel=1e-12), (rank, variant)
        local = octcoda_loss(**b, variant=variant)
        assert abs(float(local.contrastive) - want) > 1e-6  # the gather changed something
        out.contrastive.backward()
        assert so.grad is None  # the teacher is a constant
        # Gradient = d(reference)/d(local student sims) with other ranks' anchors constant.
        h, base = 1e-6, sf.detach().clone()
        for idx in range(base.numel()):
            up, down = base.clone().view(-1), base.clone().view(-1)
            up[idx] += h
            down[idx] -= h
            fd = (
                _global_reference(batches, rank, variant, up.view_as(base))
                - _global_reference(batches, rank, variant, down.view_as(base))
            ) / (2 * h)
            assert sf.grad.view(-1)[idx].item() == pytest.approx(fd, abs=1e-7), idx


@pytest.mark.slow
def test_global_scope_two_process_gloo() -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    run_ranks(_global_worker, 2, 21)
