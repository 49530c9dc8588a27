#!/usr/bin/env python
"""The global contrastive scope: what each rank sends and receives per step, and what the step
holds in memory, for the fused kernel (``fused_distill(scope="global")``) and the eager PyTorch
loss (``prototype_loss`` + ``contrastive_loss(scope="global")`` on the fp32 sims).

    .venv/bin/python benchmarks/bench_global_scope.py                 # CPU: real gloo ranks
    python3 benchmarks/bench_global_scope.py --gpu                    # one GPU: 131,072 anchors

CPU mode (the default) spawns real gloo process groups of ``--worlds`` ranks (the fused kernels
under triton's CPU interpreter) and MEASURES the collectives: ``torch.distributed.all_reduce``
and ``all_gather`` are wrapped in every rank and count the bytes handed to them (sent) and
written into this rank's outputs by the other ranks (received). Payload bytes: a ring algorithm
moves the same all-gather bytes over the wire, and 2 (w - 1) / w times the all-reduce tensor
each way. The formula each row should match is printed beside it. Memory: the peak of the bytes
of live tensor storages the step created (a TorchDispatchMode sees every op's outputs and a weak
reference tells when each storage dies; sampled at op boundaries, so temporaries inside one op
are not counted, nor the interpreter's own numpy copies; the Triton kernels allocate nothing).

GPU mode: one process stands in for a 2-rank run (``SimulatedPeers``: the other rank's anchors as
tensors; a multi-rank run needs more GPUs than the check has): 131,072 anchors per level on this
rank, 262,144 candidates, bf16, K 98, D 512. Fused: forward + backward time (CUDA events, after a
warm-up step that compiles) and peak memory (``torch.cuda.max_memory_allocated`` minus the inputs);
eager: the same loss after the gather (``supcon_loss`` with this rank's anchor slice, what
``contrastive_loss(scope="global")`` runs), which needs [131,072 x 262,144] fp32 logits (128 GiB)
and is expected to run out of memory. Exits 1 if the fused step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE, CLASSES = 10.0, 9
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- meters


class Collectives:
    """Wraps torch.distributed.all_reduce/all_gather while active; per call (name, sent bytes,
    received bytes)."""

    def __init__(self, world: int) -> None:
        self.world, self.calls = world, []

    def __enter__(self) -> Collectives:
        import torch.distributed as dist

        self._saved = (dist.all_reduce, dist.all_gather)
        reduce, gather = self._saved

        def all_reduce(tensor, *args, **kwargs):
            n = tensor.numel() * tensor.element_size()
            self.calls.append(("all_reduce", n, n))
            return reduce(tensor, *args, **kwargs)

        def all_gather(outputs, tensor, *args, **kwargs):
            n = tensor.numel() * tensor.element_size()
            got = sum(o.numel() * o.element_size() for o in outputs) - n  # the others' parts
            self.calls.append(("all_gather", n, got))
            return gather(outputs, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        dist.all_reduce, dist.all_gather = self._saved

    def total(self, name: str, which: int) -> int:
        return sum(c[which] for c in self.calls if c[0] == name)


def tensor_meter():
    """A TorchDispatchMode that tracks the peak of live storage bytes created inside it."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Meter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    s = t.untyped_storage()
                    if s.data_ptr() not in self.live and s.nbytes():
                        self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    return Meter()


# ----------------------------------------------------------------------------- one step


def make_inputs(b: int, k: int, d: int, dtype: torch.dtype, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    emb = [F.normalize(torch.randn(b, 2, d, generator=g), dim=2).to(dtype) for _ in range(2)]
    return {
        "student_emb": emb[0].to(device),
        "teacher_emb": emb[1].to(device),
        "concepts": F.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype).to(device),
        "student_labels": torch.randint(0, CLASSES, (b,), generator=g).to(device),
        "teacher_labels": torch.randint(0, CLASSES, (b,), generator=g).to(device),
    }


def fused_step(inp: dict, exchange=None, config=None) -> None:
    from multieye_dist.model.kernels import fused_distill

    es = inp["student_emb"].detach().requires_grad_()
    proto, con = fused_distill(
        es, inp["teacher_emb"], inp["concepts"], inp["student_labels"], inp["teacher_labels"],
        num_classes=CLASSES, temperature=TEMPERATURE, scope="global", exchange=exchange,
        config=config,
    )  # fmt: skip
    (0.05 * proto + 0.6 * con).backward()


def eager_step(inp: dict) -> None:
    """The PyTorch loss as octcoda_loss runs it: sims upcast to fp32, global scope."""
    from multieye_dist.model.losses import contrastive_loss, prototype_loss

    es = inp["student_emb"].detach().requires_grad_()
    sf = torch.einsum("bld,kd->blk", es, inp["concepts"]).float()
    so = torch.einsum("bld,kd->blk", inp["teacher_emb"], inp["concepts"]).float()
    ys, yt = inp["student_labels"], inp["teacher_labels"]
    proto = prototype_loss(sf, ys, so, yt, CLASSES, variant="paper")
    con = contrastive_loss(sf, so, ys, yt, temperature=TEMPERATURE, scope="global")
    (0.05 * proto + 0.6 * con).backward()


# ----------------------------------------------------------------------------- CPU: gloo ranks


def formula(impl: str, world: int, b: int, k: int, elt: int) -> tuple[int, int, int]:
    """(all-reduce bytes, all-gather bytes sent, received) per rank and step, equal batches."""
    if impl == "fused":  # class sums [2, NC, K] + counts [NC] + row counts [world], fp32
        sims = 2 * (2 * b) * k * elt  # [2 levels, 2B, K] in the working dtype
        return 4 * (2 * CLASSES * k + CLASSES + world), sims, (world - 1) * sims
    # eager: two _all_gather_rows (row count int64, then the rows): fp32 sims [2B, 2, K] and
    # int64 labels [2B]
    sent = 8 + 2 * b * 2 * k * 4 + 8 + 2 * b * 8
    return 0, sent, (world - 1) * sent


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    import torch.distributed as dist

    from multieye_dist.model.kernels import LaunchConfig

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dtype = DTYPES[args.dtype]
    config = LaunchConfig.choose(max(16, 1 << (args.k - 1).bit_length()), interpret=False)
    rows = []
    try:
        batches = [(b, False) for b in args.batches] + [(args.memory_batch, True)] * (world == 2)
        for b, memory in batches:
            inp = make_inputs(b, args.k, args.d, dtype, 1000 * rank + b, "cpu")
            steps = {
                "fused": partial(fused_step, inp, config=config),
                "eager": partial(eager_step, inp),
            }
            for impl, step in steps.items():
                meter = tensor_meter()
                t0 = time.perf_counter()
                with Collectives(world) as coll, meter:
                    step()
                rows.append({
                    "world": world, "b": b, "impl": impl, "memory": memory,
                    "calls": len(coll.calls), "reduce": coll.total("all_reduce", 1),
                    "sent": coll.total("all_gather", 1), "recv": coll.total("all_gather", 2),
                    "peak": meter.peak, "s": time.perf_counter() - t0,
                })  # fmt: skip
                dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_dir, f"world{world}.json").write_text(json.dumps(rows))


def run_cpu(args: argparse.Namespace) -> int:
    import socket

    import torch.multiprocessing as mp

    os.environ["TRITON_INTERPRET"] = "1"  # the spawned ranks inherit it
    elt = DTYPES[args.dtype].itemsize
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_global_") as tmp:
        for world in args.worlds:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_rank, args=(world, port, args, tmp), nprocs=world, join=True,
                               start_method="spawn")  # fmt: skip
            rows += json.loads(Path(tmp, f"world{world}.json").read_text())
    ok = True
    print(
        f"\nCommunication per rank and step (rank 0, measured on gloo; {args.dtype} "
        f"embeddings, K {args.k}, {CLASSES} classes; bytes):\n"
    )
    print(
        "| world | samples/rank | anchors/rank/level | candidates/level | impl | collectives "
        "| all-reduce | all-gather sent | all-gather received | formula (reduce/sent/recv) "
        "| match |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|")
    for r in (r for r in rows if not r["memory"]):
        want = formula(r["impl"], r["world"], r["b"], args.k, elt)
        got = (r["reduce"], r["sent"], r["recv"])
        ok &= got == want
        print(
            f"| {r['world']} | {r['b']} | {2 * r['b']} | {2 * r['b'] * r['world']} | "
            f"{r['impl']} | {r['calls']} | {got[0]:,} | {got[1]:,} | {got[2]:,} | "
            f"{want[0]:,} / {want[1]:,} / {want[2]:,} | {'yes' if got == want else 'NO'} |"
        )
    print(
        f"\nMemory of one step (forward + backward), rank 0 of 2, {args.dtype}, K {args.k}, "
        f"D {args.d}: peak bytes of live tensors the step created (see the docstring):\n"
    )
    print(
        "| samples/rank | anchors/rank/level | candidates/level | impl | peak MiB "
        "| eager logits [2B x N] fp32, MiB | CPU s |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in (r for r in rows if r["memory"]):
        n, big = 2 * r["b"], 2 * r["b"] * r["world"]
        print(
            f"| {r['b']} | {n} | {big} | {r['impl']} | {r['peak'] / 2**20:.1f} | "
            f"{n * big * 4 / 2**20:.1f} | {r['s']:.1f} |"
        )
    return 0 if ok else 1


# ----------------------------------------------------------------------------- GPU: one process


def _timed(fn, device: str) -> tuple[str, float | None, float | None]:
    """(status, ms, peak MiB above what was allocated before) of one call of fn."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return "ok", (time.perf_counter() - t0) * 1e3, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:  # (older torch lacks torch.OutOfMemoryError)
        return "OOM", None, (torch.cuda.max_memory_allocated() - base) / 2**20
    return "ok", start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**20


def run_one_gpu(args: argparse.Namespace) -> int:
    from multieye_dist.model.kernels import SimulatedPeers
    from multieye_dist.model.losses import prototype_loss, supcon_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    dtype, b, k = DTYPES[args.dtype], args.local_batch, args.k
    inp = make_inputs(b, k, args.d, dtype, 0, device)
    g = torch.Generator().manual_seed(1)
    peers = (torch.randn(2, args.peer_anchors, k, generator=g) * 0.5).to(dtype).to(device)
    peer_labels = torch.randint(0, CLASSES, (args.peer_anchors,), generator=g).to(device)
    exchange = SimulatedPeers(peers, peer_labels, CLASSES)
    n, total = 2 * b, 2 * b + args.peer_anchors

    def eager() -> None:  # contrastive_loss(scope="global") after its gather, + prototype
        es = inp["student_emb"].detach().requires_grad_()
        sf = torch.einsum("bld,kd->blk", es, inp["concepts"]).float()
        so = torch.einsum("bld,kd->blk", inp["teacher_emb"], inp["concepts"]).float()
        ys, yt = inp["student_labels"], inp["teacher_labels"]
        feats = torch.cat([sf, so, peers.float().transpose(0, 1)])
        labels = torch.cat([ys, yt, peer_labels])
        con = torch.stack([
            supcon_loss(feats[:, lv], labels, TEMPERATURE, anchor_slice=slice(0, n))
            for lv in range(2)
        ]).mean()  # fmt: skip
        proto = prototype_loss(sf, ys, so, yt, CLASSES, variant="paper")
        (0.05 * proto + 0.6 * con).backward()

    rows = []
    t0 = time.perf_counter()
    fused_step(inp, exchange)  # warm-up: triton compiles the global kernels here
    print(f"fused warm-up (compile + one step): {time.perf_counter() - t0:.1f} s", flush=True)
    for name, fn in (("fused", lambda: fused_step(inp, exchange)), ("eager", eager)):
        status, ms, mib = _timed(fn, device)
        rows.append((name, status, ms, mib))
        print(f"{name}: {status}", flush=True)
    chip = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"\nGlobal scope on one {device} ({chip}), {args.dtype}, K {k}, D {args.d}: this rank "
        f"{b:,} samples = {n:,} anchors per level; candidates {total:,} per level (the other "
        f"ranks simulated: SimulatedPeers). Eager "
        f"logits alone: {n * total * 4 / 2**30:.1f} GiB per level.\n"
    )
    print("| impl | status | forward + backward ms | peak MiB above inputs |")
    print("|---|---|---:|---:|")
    for name, status, ms, mib in rows:
        ms_s = "-" if ms is None else f"{ms:.1f}"
        mib_s = "-" if mib is None else f"{mib:,.0f}"
        print(f"| {name} | {status} | {ms_s} | {mib_s} |")
    return 0 if rows[0][1] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the one-process GPU check (CPU if none)")
    p.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128])
    p.add_argument("--memory-batch", type=int, default=512, help="samples/rank of the memory row")
    p.add_argument("--local-batch", type=int, default=65536, help="GPU mode: samples on this rank")
    p.add_argument(
        "--peer-anchors", type=int, default=131072, help="GPU mode: other ranks' anchors"
    )
    p.add_argument("--k", type=int, default=98)
    p.add_argument("--d", type=int, default=64, help="embedding width (GPU mode: 512 is usual)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    if args.k < 1 or args.d < 1 or min(args.batches) < 1 or args.memory_batch < 1:
        p.error("--k, --d, --batches and --memory-batch must be >= 1")
    return run_one_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
