"""Tests for multieye_dist.model.kernels: the fused Triton distillation step against the float64
reference of multieye_dist.model.losses, on CPU under triton's interpreter (TRITON_INTERPRET=1).

Every check draws fresh random inputs from a seed printed in its failure message; set
MULTIEYE_TEST_SEED=<seed> to replay one. The interpreter is slow, so shapes are small (B <= 40,
K <= 50, D <= 70) but chosen so that they are not multiples of the 16-wide interpreter tiles,
plus one check at a few hundred anchors with the GPU's tile sizes.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernelcheck import NAMES, TOL, assert_close, fresh_seed, interpreter, rel_err  # noqa: F401

from multieye_dist.model.kernels import (
    LaunchConfig,
    fused_distill,
    interpret_mode,
    octcoda_loss_fused,
    resolve_impl,
    triton_available,
)
from multieye_dist.model.losses import contrastive_loss, octcoda_loss, prototype_loss

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["random", "missing", "single_class", "singletons", "disjoint", "one_pair"]

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.usefixtures("interpreter"),
]


# ----------------------------------------------------------------------------- inputs


def make_labels(
    scenario: str, b: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(y_f, y_o, num_classes) exercising one edge of the class bookkeeping."""

    def draw(lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi, (b,), generator=g)

    if scenario == "random":
        nc = int(torch.randint(2, 13, (), generator=g))
        return draw(0, nc), draw(0, nc), nc
    if scenario == "missing":  # partial overlap: some classes on one side only
        nc = int(torch.randint(4, 13, (), generator=g))
        return draw(0, nc // 2 + 1), draw(nc // 2, nc), nc
    if scenario == "single_class":
        nc = int(torch.randint(1, 10, (), generator=g))
        c = int(torch.randint(0, nc, (), generator=g))
        return torch.full((b,), c), torch.full((b,), c), nc
    if scenario == "singletons":  # most anchors have no positive at all
        nc = 2 * b + 3
        labels = torch.randperm(nc, generator=g)[: 2 * b]
        labels[0] = labels[-1]  # one pair (student 0, teacher B-1) keeps one anchor class alive
        return labels[:b], labels[b:], nc
    if scenario == "disjoint":  # no shared class: prototype term 0, contrastive within sides
        nc = int(torch.randint(2, 10, (), generator=g))
        return draw(0, nc), draw(nc, 2 * nc), 2 * nc
    if scenario == "one_pair":  # B = 1
        nc = 3
        return draw(0, 2), draw(0, 2), nc
    raise AssertionError(scenario)


def make_inputs(seed: int, scenario: str, dtype: torch.dtype, scale: float = 1.0) -> dict:
    """Embeddings shaped like the model's: level 1 unit-norm (v), level 2 free (u); a unit-norm
    concept bank (text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    b = 1 if scenario == "one_pair" else int(torch.randint(2, 41, (), generator=g))
    k = int(torch.randint(3, 51, (), generator=g))
    d = int(torch.randint(5, 71, (), generator=g))

    def emb() -> torch.Tensor:
        v = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
        u = torch.randn(b, d, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(d))
        return torch.stack([v, u], dim=1) * scale

    ys, yt, nc = make_labels(scenario, b, g)
    temperature = math.exp(
        float(torch.empty(()).uniform_(math.log(0.3), math.log(10), generator=g))
    )
    concepts = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return {
        "student_emb": emb().to(dtype),
        "teacher_emb": emb().to(dtype),
        "concepts": concepts.to(dtype),
        "student_labels": ys,
        "teacher_labels": yt,
        "num_classes": nc,
        "temperature": temperature,
        "weights": torch.rand(2, generator=g, dtype=torch.float64) + 0.1,
        "desc": f"seed={seed} scenario={scenario} dtype={dtype} B={b} K={k} D={d} nc={nc} "
        f"T={temperature:.3f} y_f={ys.tolist()} y_o={yt.tolist()}",
    }


def reference(
    inp: dict, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prototype, contrastive, grad student_emb, grad concepts) of losses.py computed in
    ``dtype`` (float64: the reference), for the loss w0 * prototype + w1 * contrastive."""
    es = inp["student_emb"].detach().to(dtype).requires_grad_()
    c = inp["concepts"].detach().to(dtype).requires_grad_()
    sf = torch.einsum("bld,kd->blk", es, c)
    so = torch.einsum("bld,kd->blk", inp["teacher_emb"].to(dtype), c)
    ys, yt = inp["student_labels"], inp["teacher_labels"]
    proto = prototype_loss(sf, ys, so, yt, inp["num_classes"], variant="paper")
    con = contrastive_loss(
        sf, so, ys, yt, temperature=inp["temperature"], variant="paper", scope="local"
    )
    w = inp["weights"].to(dtype)
    (w[0] * proto + w[1] * con).backward()
    return proto.detach(), con.detach(), es.grad, c.grad


def fused(inp: dict, config: LaunchConfig | None = None) -> tuple[torch.Tensor, ...]:
    es = inp["student_emb"].clone().requires_grad_()
    c = inp["concepts"].clone().requires_grad_()
    proto, con = fused_distill(
        es,
        inp["teacher_emb"],
        c,
        inp["student_labels"],
        inp["teacher_labels"],
        num_classes=inp["num_classes"],
        temperature=inp["temperature"],
        config=config,
    )
    w = inp["weights"]
    (w[0] * proto + w[1] * con).backward()
    return proto.detach(), con.detach(), es.grad, c.grad


def assert_matches(inp: dict, got: tuple) -> None:
    """The kernel's result against the float64 reference of the same inputs: 1e-5 in fp32; for
    16-bit inputs 1%, or twice what PyTorch itself loses in that dtype where that is more
    (kernelcheck.assert_close says why)."""
    dtype = inp["student_emb"].dtype
    eager = None if dtype == torch.float32 else reference(inp, dtype)
    assert_close(got, reference(inp), TOL[dtype], inp["desc"], eager)


# ----------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_float64_reference(scenario: str, dtype: torch.dtype) -> None:
    inp = make_inputs(fresh_seed(), scenario, dtype)
    assert_matches(inp, fused(inp))


def test_edge_values_are_exact_zeros() -> None:
    """One pair of different classes: no shared class and no positive, so both terms are 0 and
    no gradient flows (not NaN); one pair of one class: each anchor's only candidate is its
    positive, so the contrastive term is exactly log 1 = 0 too."""
    inp = make_inputs(fresh_seed(), "one_pair", torch.float32)
    for same in (False, True):
        inp["teacher_labels"] = inp["student_labels"] + (0 if same else 1)
        proto, con, d_emb, d_c = fused(inp)
        assert float(con) == pytest.approx(0.0, abs=1e-6), inp["desc"]
        if not same:
            assert float(proto) == 0.0 and d_emb.abs().max() == 0 and d_c.abs().max() == 0


def test_fp16_and_large_logits() -> None:
    """fp16 inputs; and fp32 inputs with logits in the hundreds, where a log-sum-exp without the
    running maximum would overflow. Logits that large cost fp32 digits in any implementation, so
    there the bar is the fp32 PyTorch reference's own error (or 4e-5, whichever is larger):
    logits of 300 carry ~300 x 6e-8 = 2e-5 of rounding into every exponent, and over seeds
    5000-5039 the gradient's error exceeded 1e-5 (the old floor, a CI flake) 3 times, by at
    most 1.43e-5."""
    inp = make_inputs(fresh_seed(), "random", torch.float16)
    assert_matches(inp, fused(inp))

    inp = make_inputs(fresh_seed(), "random", torch.float32)
    c = inp["concepts"].double()
    x = torch.cat([inp[n].double() for n in ("student_emb", "teacher_emb")]) @ c.T  # [2B, 2, K]
    dots = torch.einsum("jlk,ilk->lji", x, x) - torch.diag_embed(x.pow(2).sum(2).T)
    inp["temperature"] = float(dots.abs().max()) / 300  # off-diagonal logits up to +-300
    desc = f"{inp['desc']} T={inp['temperature']:.3g} (logits up to 300)"
    want, got, fp32 = reference(inp), fused(inp), reference(inp, torch.float32)
    for name, a, b, c32 in zip(NAMES, got, want, fp32, strict=True):
        bar = max(4e-5, 4 * rel_err(c32, b))
        assert rel_err(a, b) <= bar, f"{name}: {rel_err(a, b):.3g} > {bar:.3g} ({desc})"


def test_one_output_used_and_no_concept_grad() -> None:
    """Backward through one of the two outputs only (the other's gradient is None inside
    autograd), with a concept bank that does not require grad (the normal case: a buffer)."""
    inp = make_inputs(fresh_seed(), "random", torch.float32)
    for used in (0, 1):
        es = inp["student_emb"].clone().requires_grad_()
        terms = fused_distill(
            es, inp["teacher_emb"], inp["concepts"], inp["student_labels"],
            inp["teacher_labels"], num_classes=inp["num_classes"],
            temperature=inp["temperature"],
        )  # fmt: skip
        terms[used].backward()
        inp["weights"] = torch.tensor([1.0, 0.0] if used == 0 else [0.0, 1.0], dtype=torch.float64)
        _, _, want, _ = reference(inp)
        err = rel_err(es.grad, want)
        assert err <= 1e-5, f"output {used} alone: relative error {err:.3g} ({inp['desc']})"


def test_teacher_is_a_constant() -> None:
    inp = make_inputs(fresh_seed(), "random", torch.float32)
    et = inp["teacher_emb"].clone().requires_grad_()
    es = inp["student_emb"].clone().requires_grad_()
    proto, con = fused_distill(
        es, et, inp["concepts"], inp["student_labels"], inp["teacher_labels"],
        num_classes=inp["num_classes"], temperature=inp["temperature"],
    )  # fmt: skip
    (proto + con).backward()
    assert et.grad is None and es.grad is not None, inp["desc"]


def test_larger_batch_with_gpu_tiles() -> None:
    """A few hundred anchors with the tile sizes used on the GPU (64-row tiles, K padded to 128),
    non-contiguous embeddings, int32 labels, and a float64 concept bank (cast to float32)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, k, d = 150 + int(torch.randint(0, 20, (), generator=g)), 98, 40
    inp = make_inputs(seed, "random", torch.float32)
    full = torch.randn(b, 3, d, generator=g)
    inp["student_emb"] = F.normalize(full[:, ::2], dim=2)  # [B, 2, D], stride 3 * D per row
    inp["teacher_emb"] = F.normalize(torch.randn(b, 2, d, generator=g), dim=2)
    inp["concepts"] = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    inp["student_labels"] = torch.randint(0, 9, (b,), generator=g, dtype=torch.int32)
    inp["teacher_labels"] = torch.randint(0, 9, (b,), generator=g, dtype=torch.int32)
    inp["num_classes"] = 9
    inp["desc"] = f"seed={seed} B={b} K={k} D={d}"
    config = LaunchConfig.choose(128, interpret=False)
    assert_close(fused(inp, config), reference(inp), 1e-5, inp["desc"])


def on_device(inp: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_compiled_kernels(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the compiled kernels (GPU tile sizes, tensor-core dots) against the float64
    reference, on every scenario and on a batch of a few thousand anchors."""
    monkeypatch.delenv("TRITON_INTERPRET")  # the kernel module re-imports itself compiled
    for scenario in SCENARIOS:
        inp = on_device(make_inputs(fresh_seed(), scenario, dtype), "cuda")
        assert_matches(inp, fused(inp))
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, k, d = 2000 + int(torch.randint(0, 100, (), generator=g)), 98, 512
    inp = make_inputs(seed, "random", dtype)
    v = F.normalize(torch.randn(2, b, d, generator=g, dtype=torch.float64), dim=2)
    u = torch.randn(2, b, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    inp["student_emb"], inp["teacher_emb"] = (
        torch.stack([v[i], u[i]], 1).to(dtype) for i in (0, 1)
    )
    inp["concepts"] = F.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype)
    inp["student_labels"], inp["teacher_labels"] = torch.randint(0, 9, (2, b), generator=g)
    inp["num_classes"], inp["temperature"] = 9, 10.0
    inp["desc"] = f"seed={seed} B={b} K={k} D={d} dtype={dtype}"
    inp = on_device(inp, "cuda")
    assert_matches(inp, fused(inp))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "autocast-bf16"])
def test_cuda_fused_loss_in_a_training_step(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU: one student step (test_resnet, the frozen teacher, the OCT-CoDA loss, fused
    AdamW) with the distillation terms from the compiled kernels and from PyTorch, from the same
    weights and batch: the same loss terms and the same gradients for the student's parameters,
    backbone included, and finite weights after the step. In fp32 each parameter's gradient
    agrees to 1e-3; under bf16 autocast the gradients of the BatchNorm shifts are sums with
    cancellation (5 % apart on the CPU), so all gradients together agree to 3e-2."""
    import copy

    from multieye_dist.model.concept_model import ConceptModel, FrozenTeacher, ModelConfig
    from multieye_dist.model.concepts import load_bank

    monkeypatch.delenv("TRITON_INTERPRET")  # the kernel module re-imports itself compiled
    seed = fresh_seed()
    desc = f"seed={seed} {precision}"
    torch.manual_seed(seed)
    bank = load_bank(ROOT / "configs" / "concepts" / "minilm-l6.safetensors")[0]
    cfg = ModelConfig(backbone="test_resnet")
    bf16 = precision == "autocast-bf16"
    student = ConceptModel(cfg, bank).cuda().train()
    teacher_dtype = torch.bfloat16 if bf16 else torch.float32
    teacher = FrozenTeacher(ConceptModel(cfg, bank).cuda(), dtype=teacher_dtype)
    b = 96
    x_f, x_o = torch.randn(2, b, 3, 32, 32, device="cuda").unbind(0)
    y_f = torch.randint(0, 9, (b,), device="cuda")
    y_o = torch.randint(0, 9, (b,), device="cuda")
    kw = {"alpha": 0.6, "beta": 0.05, "temperature": 10.0}
    runs = {}
    for impl in ("triton", "torch"):
        model = copy.deepcopy(student)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            z_f, e_f = model(x_f, return_embeddings=True)
            z_o, e_o = teacher.embeddings(x_o)
        if impl == "triton":
            print(
                f"{precision}: embeddings into the kernel: student {e_f.dtype}, teacher {e_o.dtype}"
            )
        out = octcoda_loss_fused(z_f, e_f, y_f, z_o, e_o, y_o, model.concepts, **kw, impl=impl)
        # The gate of a random pair of models may be closed: train on the distillation terms
        # themselves too, so that their gradient reaches the backbone either way.
        loss = out.total + kw["beta"] * out.prototype + kw["alpha"] * out.contrastive
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        runs[impl] = (out, grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    (fast, g_fast, w_fast), (ref, g_ref, _) = runs["triton"], runs["torch"]
    assert bool(fast.gated) == bool(ref.gated), desc
    for name in ("total", "cls", "prototype", "contrastive"):
        a, r = getattr(fast, name), getattr(ref, name)
        assert torch.isfinite(a), f"{name}: {a} ({desc})"
        err = rel_err(a, r)
        assert err <= (2e-2 if bf16 else 1e-5), f"{name}: relative error {err:.3g} ({desc})"
    assert g_fast.keys() == g_ref.keys()
    errs = {n: rel_err(g_fast[n], g_ref[n]) for n in g_ref}
    worst = max(errs, key=errs.get)
    print(f"{precision}: worst gradient {worst}, relative error {errs[worst]:.2e}")
    if bf16:
        cat = [torch.cat([g[n].flatten() for n in g_ref]) for g in (g_fast, g_ref)]
        err = rel_err(*cat)
        assert err <= 3e-2, f"all gradients: relative error {err:.3g} ({desc})"
    else:
        assert errs[worst] <= 1e-3, f"d {worst}: relative error {errs[worst]:.3g} ({desc})"
    before = dict(student.named_parameters())
    for n, w in w_fast.items():
        assert torch.isfinite(w).all(), f"{n} not finite after the step ({desc})"
    assert any(bool((w_fast[n] != before[n]).any()) for n in w_fast), f"no step ({desc})"


def test_validation_errors() -> None:
    inp = make_inputs(fresh_seed(), "random", torch.float32)
    args = [inp[n] for n in ("student_emb", "teacher_emb", "concepts")]
    labels = (inp["student_labels"], inp["teacher_labels"])
    kw = {"num_classes": inp["num_classes"], "temperature": 1.0}
    with pytest.raises(TypeError, match="loss.impl=torch"):
        fused_distill(*(a.double() for a in args), *labels, **kw)
    with pytest.raises(ValueError, match="K <= 256"):
        big = torch.randn(257, args[0].shape[2])
        fused_distill(args[0], args[1], big, *labels, **kw)
    with pytest.raises(ValueError, match=r"\[B>=1, 2, D\]"):
        fused_distill(args[0][:, :1], args[1], args[2], *labels, **kw)
    with pytest.raises(ValueError, match="teacher_emb"):
        fused_distill(args[0], args[1][:-1], args[2], *labels, **kw)
    with pytest.raises(ValueError, match="temperature"):
        fused_distill(*args, *labels, num_classes=3, temperature=0.0)


# ----------------------------------------------------------------------------- the loss


def loss_inputs(seed: int, gate_open: bool, poison: bool = False) -> dict:
    """A full octcoda batch (9 classes) with logits chosen so the gate is open (a student
    confidently wrong, a teacher mostly right whose remaining mass sits on other classes, so
    d_t < d_s and d_st > delta) or closed (the same with the two roles swapped)."""
    inp = make_inputs(seed, "random", torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    b, nc = inp["student_emb"].shape[0], 9
    ys = torch.randint(0, nc, (b,), generator=g)
    yo = torch.randint(0, nc, (b,), generator=g)
    noise = torch.randn(b, nc, generator=g) * 0.1
    wrong = 6 * F.one_hot((ys + 1) % nc, nc) + noise
    right = 4 * F.one_hot(ys, nc) + 2 * F.one_hot((ys + 2) % nc, nc) + noise
    zf, zo = (wrong, right) if gate_open else (right, wrong)
    es = inp["student_emb"].clone()
    if poison:  # an inf in an anchor that has a positive (its OCT partner's label)
        es[0, 1, 0] = float("inf")
        yo[0] = ys[0]
    return {
        "student_logits": zf, "student_emb": es, "student_labels": ys,
        "teacher_logits": zo, "teacher_emb": inp["teacher_emb"],
        "teacher_labels": yo, "concepts": inp["concepts"],
        "desc": f"{inp['desc']} (labels redrawn: y_f={ys.tolist()} y_o={yo.tolist()})",
    }  # fmt: skip


@pytest.mark.parametrize("gate_open", [True, False])
def test_octcoda_loss_fused_matches_reference(gate_open: bool) -> None:
    inp = loss_inputs(fresh_seed(), gate_open)
    desc = inp.pop("desc")
    kw = {"alpha": 0.6, "beta": 0.05, "temperature": 10.0}
    outs, grads = [], []
    for impl in ("triton", "torch"):
        zf = inp["student_logits"].clone().requires_grad_()
        es = inp["student_emb"].clone().requires_grad_()
        out = octcoda_loss_fused(
            **{**inp, "student_logits": zf, "student_emb": es}, **kw, impl=impl
        )
        out.total.backward()
        outs.append(out)
        grads.append((zf.grad, es.grad))
    fast, ref = outs
    assert bool(fast.gated) == bool(ref.gated) == gate_open, desc
    for name in ("total", "cls", "prototype", "contrastive"):
        err = rel_err(getattr(fast, name), getattr(ref, name))
        assert err <= 1e-5, f"{name}: relative error {err:.3g} ({desc})"
    for name, a, b in zip(("d logits", "d student_emb"), *grads, strict=True):
        assert rel_err(a, b) <= 1e-5, f"{name}: relative error {rel_err(a, b):.3g} ({desc})"
    if not gate_open:  # closed: 0 * distill, the embeddings still get a (zero) gradient
        assert grads[0][1].abs().max() == 0, desc
    # The torch implementation is octcoda_loss on the sims, nothing else.
    emb = (inp["student_emb"], inp["teacher_emb"])
    sims = [torch.einsum("bld,kd->blk", e, inp["concepts"]) for e in emb]
    direct = octcoda_loss(
        inp["student_logits"], sims[0], inp["student_labels"], inp["teacher_logits"], sims[1],
        inp["teacher_labels"], **kw,
    )  # fmt: skip
    assert direct.total.item() == ref.total.item(), desc


# numpy (under the interpreter) warns about the inf and NaN this test feeds in on purpose.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_octcoda_loss_fused_drops_non_finite_distillation() -> None:
    inp = loss_inputs(fresh_seed(), gate_open=True, poison=True)
    desc = inp.pop("desc")
    for impl in ("triton", "torch"):
        out = octcoda_loss_fused(**inp, impl=impl)
        assert not torch.isfinite(out.contrastive), f"{impl}: {desc}"
        assert out.gated and out.total.item() == out.cls.item(), f"{impl}: {desc}"


def test_octcoda_loss_fused_checks_labels() -> None:
    inp = loss_inputs(fresh_seed(), gate_open=True)
    inp.pop("desc")
    inp["teacher_labels"] = inp["teacher_labels"].clone()
    inp["teacher_labels"][0] = inp["student_logits"].shape[1]
    with pytest.raises(ValueError, match="teacher_labels must lie in"):
        octcoda_loss_fused(**inp, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        octcoda_loss_fused(**inp, impl="auto")


# ----------------------------------------------------------------------------- selection


def test_resolve_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("auto", cuda) == "triton"
    assert resolve_impl("torch", cuda) == "torch"
    assert resolve_impl("triton", cuda) == "triton"
    assert interpret_mode() and resolve_impl("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="loss.impl=triton needs a CUDA device"):
        resolve_impl("triton", "cpu")
    inp = make_inputs(fresh_seed(), "random", torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors.*loss.impl=torch"):
        fused(inp)
    with pytest.raises(ValueError, match="unknown loss.impl 'fast'"):
        resolve_impl("fast", cpu)


def test_import_without_triton() -> None:
    """The package imports, and auto falls back to torch, where triton is missing; asking for
    the Triton implementation is then a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, multieye_dist.model.kernels as k\n"
        "assert not k.triton_available()\n"
        "assert k.resolve_impl('auto', torch.device('cuda')) == 'torch'\n"
        "try:\n"
        "    k.resolve_impl('triton', torch.device('cuda'))\n"
        "except ValueError as e:\n"
        "    assert 'loss.impl' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_benchmark_cpu_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/bench_kernel.py's tiny CPU mode runs end to end and prints its table last."""
    spec = importlib.util.spec_from_file_location(
        "bench_kernel", ROOT / "benchmarks" / "bench_kernel.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    bench.main(["--device", "cpu", "--sizes", "5,21", "--repeat", "1", "--warmup", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in out if line.startswith("|")]
    assert rows and out[-1] == rows[-1], "\n".join(out)
    assert len([r for r in rows if r.startswith("| 5 ") or r.startswith("| 21 ")]) == 2, "\n".join(
        out
    )
