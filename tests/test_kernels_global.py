"""Tests for the global contrastive scope of the fused Triton kernel
(``fused_distill(scope="global")``), on CPU under triton's interpreter (TRITON_INTERPRET=1),
against the float64 PyTorch global scope of multieye_dist.model.losses.

Two spawned gloo ranks with ragged batch sizes run every label scenario in fp32 and bf16; one
process checks the world-1 case (global == local) and the one-process stand-in for other ranks
(``SimulatedPeers``) that the benchmarks use. Every check draws fresh inputs from a seed printed
in its failure message; MULTIEYE_TEST_SEED=<seed> replays one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks
from kernelcheck import TOL, assert_close, fresh_seed, interpreter  # noqa: F401

from multieye_dist.model.kernels import SimulatedPeers, fused_distill, triton_available
from multieye_dist.model.losses import contrastive_loss, prototype_loss, supcon_loss

# Scenarios of labels across the ranks: "random"; "rank_classes" (each rank its own classes:
# the other rank's anchors are negatives only); "cross_only" (a class appears once per rank:
# every positive is on the other rank, so the local scope would have none); "tiny" (rank 0 has
# B = 1).
SCENARIOS = ("random", "rank_classes", "cross_only", "tiny")

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.usefixtures("interpreter"),
]


def rank_inputs(seed: int, scenario: str, rank: int, world: int, dtype: torch.dtype) -> dict:
    """Rank ``rank``'s batch of one scenario; the same seed gives every rank the same K, D, T and
    classes. Batches are ragged (B = 9 + 4r, or 1 on rank 0 for "tiny")."""
    g = torch.Generator().manual_seed(seed)
    k, d = int(torch.randint(3, 40, (), generator=g)), int(torch.randint(5, 50, (), generator=g))
    temperature = math.exp(float(torch.empty(()).uniform_(math.log(0.3), 2.3, generator=g)))
    concepts = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    sizes = [1 if (scenario == "tiny" and r == 0) else 9 + 4 * r for r in range(world)]
    b = sizes[rank]
    g.manual_seed(seed + 1 + rank)  # this rank's own draws
    if scenario in ("random", "tiny"):
        nc = 5
        ys, yt = torch.randint(0, nc, (2, b), generator=g)
    elif scenario == "rank_classes":
        nc = 3 * world
        ys, yt = torch.randint(3 * rank, 3 * rank + 3, (2, b), generator=g)
    elif scenario == "cross_only":
        nc = 2 * max(sizes)
        ys, yt = torch.randperm(nc, generator=g)[: 2 * b].view(2, b)
    else:
        raise AssertionError(scenario)
    v = F.normalize(torch.randn(2, b, d, generator=g, dtype=torch.float64), dim=2)
    u = torch.randn(2, b, d, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(d))
    student, teacher = (torch.stack([v[i], u[i]], dim=1) for i in (0, 1))
    return {
        "student_emb": student.to(dtype),
        "teacher_emb": teacher.to(dtype),
        "concepts": concepts.to(dtype),
        "student_labels": ys,
        "teacher_labels": yt,
        "num_classes": nc,
        "temperature": temperature,
        "desc": f"seed={seed} scenario={scenario} dtype={dtype} rank={rank} B={sizes} K={k} "
        f"D={d} nc={nc} T={temperature:.3f}",
    }


WEIGHTS = (0.3, 0.7)  # prototype, contrastive: both terms' gradients checked at once


def reference(
    inp: dict, scope: str, extra: tuple | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    """(prototype, contrastive, d student_emb, d concepts) of losses.py in `dtype` (float64: the
    reference). ``extra`` (sims [2, N, K], labels [N]) are other ranks' anchors appended after
    this rank's (the SimulatedPeers case, without a process group)."""
    es = inp["student_emb"].detach().to(dtype).requires_grad_()
    c = inp["concepts"].detach().to(dtype).requires_grad_()
    sf = torch.einsum("bld,kd->blk", es, c)
    so = torch.einsum("bld,kd->blk", inp["teacher_emb"].to(dtype), c).detach()
    ys, yt, t = inp["student_labels"], inp["teacher_labels"], inp["temperature"]
    proto = prototype_loss(sf, ys, so, yt, inp["num_classes"], variant="paper")
    if extra is None:
        con = contrastive_loss(sf, so, ys, yt, temperature=t, variant="paper", scope=scope)
    else:
        feats = torch.cat([sf, so, extra[0].to(dtype).transpose(0, 1)])
        labels = torch.cat([ys, yt, extra[1]])
        n = 2 * ys.shape[0]
        con = torch.stack(
            [supcon_loss(feats[:, lv], labels, t, anchor_slice=slice(0, n)) for lv in (0, 1)]
        ).mean()
    (WEIGHTS[0] * proto + WEIGHTS[1] * con).backward()
    return proto.detach(), con.detach(), es.grad, c.grad


def fused(inp: dict, scope: str, exchange=None) -> tuple[torch.Tensor, ...]:
    es = inp["student_emb"].clone().requires_grad_()
    c = inp["concepts"].clone().requires_grad_()
    proto, con = fused_distill(
        es, inp["teacher_emb"], c, inp["student_labels"], inp["teacher_labels"],
        num_classes=inp["num_classes"], temperature=inp["temperature"], scope=scope,
        exchange=exchange,
    )  # fmt: skip
    (WEIGHTS[0] * proto + WEIGHTS[1] * con).backward()
    return proto.detach(), con.detach(), es.grad, c.grad


class _CountCollectives:
    """Counts torch.distributed collectives (all_gather, all_reduce) made while active."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __enter__(self) -> _CountCollectives:
        import torch.distributed as dist

        self._saved = {n: getattr(dist, n) for n in self.NAMES}
        for n, fn in self._saved.items():
            setattr(dist, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for n, fn in self._saved.items():
            setattr(dist, n, fn)


def _two_rank_worker(rank: int, world: int, seed: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for i, scenario in enumerate(SCENARIOS):
            inp = rank_inputs(seed + 100 * i, scenario, rank, world, dtype)
            es = inp["student_emb"].clone().requires_grad_()
            with _CountCollectives() as fwd:
                proto, con = fused_distill(
                    es, inp["teacher_emb"], inp["concepts"], inp["student_labels"],
                    inp["teacher_labels"], num_classes=inp["num_classes"],
                    temperature=inp["temperature"], scope="global",
                )  # fmt: skip
            with _CountCollectives() as bwd:
                (WEIGHTS[0] * proto + WEIGHTS[1] * con).backward()
            # Every rank, whatever its batch: one all-reduce and one all-gather in the forward;
            # nothing in the backward, so no gradient can reach another rank's rows.
            assert sorted(fwd.calls) == ["all_gather", "all_reduce"], (fwd.calls, inp["desc"])
            assert bwd.calls == [], (bwd.calls, inp["desc"])
            assert es.grad is not None and es.grad.shape == es.shape, inp["desc"]
            want = reference(inp, "global")
            eager = None if dtype == torch.float32 else reference(inp, "global", dtype=dtype)
            assert_close(fused(inp, "global"), want, TOL[dtype], inp["desc"], eager)
            if scenario == "cross_only":  # the gather mattered: locally no anchor has a positive
                local = reference(inp, "local")
                assert float(local[1]) == 0.0 and float(want[1]) > 0.1, inp["desc"]


@pytest.mark.slow
def test_global_scope_matches_pytorch_on_two_gloo_ranks() -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    run_ranks(_two_rank_worker, 2, fresh_seed(), timeout=180)


def _octcoda_worker(rank: int, world: int, seed: int) -> None:
    """octcoda_loss_fused(contrastive_scope="global") against octcoda_loss's global scope, with
    the gate open on one rank and closed on the other (the collectives must still pair up)."""
    from multieye_dist.model.kernels import octcoda_loss_fused

    inp = rank_inputs(seed, "random", rank, world, torch.float32)
    b, nc = inp["student_emb"].shape[0], inp["num_classes"]
    g = torch.Generator().manual_seed(seed + rank)
    right = 4 * F.one_hot(inp["student_labels"], nc) + 0.1 * torch.randn(b, nc, generator=g)
    wrong = 6 * F.one_hot((inp["student_labels"] + 1) % nc, nc).float()
    zf, zo = (wrong, right) if rank == 0 else (right, wrong)
    outs = []
    for impl in ("triton", "torch"):
        es = inp["student_emb"].clone().requires_grad_()
        out = octcoda_loss_fused(
            zf, es, inp["student_labels"], zo, inp["teacher_emb"], inp["teacher_labels"],
            inp["concepts"], temperature=inp["temperature"], contrastive_scope="global",
            impl=impl,
        )  # fmt: skip
        (out.total + out.contrastive).backward()
        outs.append((out, es.grad))
    (fast, g_fast), (ref, g_ref) = outs
    assert bool(fast.gated) == bool(ref.gated) == (rank == 0), inp["desc"]
    for name in ("total", "prototype", "contrastive"):
        a, r = getattr(fast, name).double(), getattr(ref, name).double()
        assert abs(float(a - r)) <= 1e-5 * max(1.0, abs(float(r))), (name, inp["desc"])
    err = float((g_fast - g_ref).norm() / g_ref.norm())
    assert err <= 1e-5, f"d student_emb: {err:.3g} ({inp['desc']})"


@pytest.mark.slow
def test_octcoda_loss_fused_global_on_two_gloo_ranks() -> None:
    run_ranks(_octcoda_worker, 2, fresh_seed(), timeout=180)


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_world_one_global_is_local(dtype: torch.dtype) -> None:
    """No process group: the global scope is the local one, to the bit."""
    assert not torch.distributed.is_initialized()
    inp = rank_inputs(fresh_seed(), "random", 0, 1, dtype)
    for a, b in zip(fused(inp, "global"), fused(inp, "local"), strict=True):
        assert torch.equal(a, b), inp["desc"]


def peer_case(seed: int, scenario: str, dtype: torch.dtype, device: str = "cpu"):
    """Rank 1's inputs of a 2-rank scenario and rank 0's anchors as ``SimulatedPeers`` (its sims
    in the working dtype, placed ahead of rank 1's rows, as the gather places them)."""
    inp = rank_inputs(seed, scenario, 1, 2, dtype)
    other = rank_inputs(seed, scenario, 0, 2, dtype)
    c = other["concepts"].float()
    sims = [
        torch.einsum("bld,kd->lbk", other[n].float(), c) for n in ("student_emb", "teacher_emb")
    ]
    peers = torch.cat(sims, dim=1).to(dtype)  # [2 levels, 2B_0, K], rounded as the kernel stores
    labels = torch.cat([other["student_labels"], other["teacher_labels"]])
    exchange = SimulatedPeers(
        peers.to(device), labels.to(device), inp["num_classes"], before=peers.shape[1]
    )
    inp = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    return inp, exchange, (peers, labels)


def large_case(seed: int, dtype: torch.dtype, device: str, b: int, n_peer: int):
    """A model-sized case: K = 98, D = 512, 9 classes, this rank's B samples after ``n_peer``
    random peer anchors (split around it: 2/3 ahead of this rank's rows)."""
    g = torch.Generator().manual_seed(seed)
    k, d, nc = 98, 512, 9

    def emb() -> torch.Tensor:
        return F.normalize(torch.randn(b, 2, d, generator=g), dim=2).to(dtype)

    labels = torch.randint(0, nc, (2 * b + n_peer,), generator=g)
    inp = {
        "student_emb": emb(),
        "teacher_emb": emb(),
        "concepts": F.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype),
        "student_labels": labels[:b],
        "teacher_labels": labels[b : 2 * b],
        "num_classes": nc,
        "temperature": 10.0,
        "desc": f"seed={seed} dtype={dtype} B={b} peers={n_peer} K={k} D={d}",
    }
    inp = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in inp.items()}
    sims = (torch.randn(2, n_peer, k, generator=g) * 0.3).to(dtype).to(device)
    peer_labels = labels[2 * b :].to(device)
    exchange = SimulatedPeers(sims, peer_labels, nc, before=2 * n_peer // 3)
    return inp, exchange, (sims, peer_labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simulated_peers_match_the_gathered_reference(dtype: torch.dtype) -> None:
    """The one-process stand-in for other ranks (benchmarks, the GPU check) computes the global
    scope of this rank's anchors among the given candidates: the reference is supcon_loss on the
    concatenation with this rank's rows as the anchors. Also the model-sized case of the GPU
    test below, at a size the interpreter affords."""
    seed = fresh_seed()
    inp, exchange, extra = peer_case(seed, "random", dtype)
    got = fused(inp, "global", exchange=exchange)
    assert_close(got, reference(inp, "global", extra), TOL[dtype], inp["desc"])
    assert abs(float(got[1] - fused(inp, "local")[1])) > 1e-3, inp["desc"]
    inp, exchange, extra = large_case(seed, dtype, "cpu", 6, 29)
    got = fused(inp, "global", exchange=exchange)
    assert_close(got, reference(inp, "global", extra), TOL[dtype], inp["desc"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_global_scope(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the compiled global-scope kernels (GPU tiles, tensor-core dots, this rank's
    rows after the other's) against the float64 reference, on every scenario and on a few
    thousand candidates."""
    monkeypatch.delenv("TRITON_INTERPRET")  # the kernel module re-imports itself compiled
    for scenario in SCENARIOS:
        inp, exchange, extra = peer_case(fresh_seed(), scenario, dtype, "cuda")
        got = fused(inp, "global", exchange=exchange)
        assert_close(got, reference(inp, "global", extra), TOL[dtype], inp["desc"])
    inp, exchange, extra = large_case(fresh_seed(), dtype, "cuda", 1500, 3001)
    got = fused(inp, "global", exchange=exchange)
    assert_close(got, reference(inp, "global", extra), TOL[dtype], inp["desc"])


def test_scope_errors_and_config_choice() -> None:
    from multieye_dist.config import LossConfig
    from multieye_dist.train.objectives import resolve_loss_impl

    inp = rank_inputs(fresh_seed(), "random", 0, 1, torch.float32)
    args = [inp[n] for n in ("student_emb", "teacher_emb", "concepts")]
    labels = (inp["student_labels"], inp["teacher_labels"])
    kw = {"num_classes": inp["num_classes"], "temperature": 1.0}
    with pytest.raises(ValueError, match="unknown contrastive scope 'all'"):
        fused_distill(*args, *labels, **kw, scope="all")
    peers = SimulatedPeers(torch.zeros(2, 1, args[2].shape[0]), torch.zeros(1), 5)
    with pytest.raises(ValueError, match="only used by scope='global'"):
        fused_distill(*args, *labels, **kw, exchange=peers)
    cpu = torch.device("cpu")  # under the interpreter, triton runs on CPU tensors
    assert resolve_loss_impl(LossConfig(impl="triton", contrastive_scope="global"), cpu) == "triton"
    official = LossConfig(impl="triton", contrastive_scope="global", variant="official")
    with pytest.raises(ValueError, match="loss.variant=paper"):
        resolve_loss_impl(official, cpu)
