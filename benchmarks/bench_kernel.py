#!/usr/bin/env python
"""Fused Triton distillation step against the PyTorch reference: forward + backward time and
peak memory of the two "paper" distillation terms, from embeddings.

    .venv/bin/python benchmarks/bench_kernel.py                  # GPU: N = 64 ... 65536
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_kernel.py --device cpu   # smoke test

N is the batch (fundus samples; as many OCT partners), so each level's contrastive term has
2N anchors and the reference holds (2N) x (2N) logits. Three methods, same inputs:

* eager: sims = einsum(emb, C) upcast to fp32 as ``octcoda_loss`` does, then
  ``beta * prototype_loss + alpha * contrastive_loss`` (variant "paper", local scope);
* compile: ``torch.compile`` of that same function (compile time excluded by the warm-up);
* triton: ``multieye_dist.model.kernels.fused_distill`` on the embeddings.

Time: median over ``--repeat`` runs of forward + backward (gradient to the student embeddings),
CUDA events. Memory: peak allocated during one step minus what was allocated before it (the
inputs), i.e. what the step itself needs. An out-of-memory case is reported as OOM. The table is
printed last; ratios are against eager and compile measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from multieye_dist.model.losses import contrastive_loss, prototype_loss

logger = logging.getLogger("bench_kernel")

ALPHA, BETA, TEMPERATURE, CLASSES = 0.6, 0.05, 10.0, 9


@dataclass
class Result:
    ms: float | None = None
    mib: float | None = None
    status: str = "ok"  # ok | OOM | error
    terms: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)


def reference_terms(es, et, concepts, ys, yt) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager path: sims as the model makes them, upcast to fp32 as octcoda_loss does."""
    sf = torch.einsum("bld,kd->blk", es, concepts).float()
    so = torch.einsum("bld,kd->blk", et, concepts).float()
    proto = prototype_loss(sf, ys, so, yt, CLASSES, variant="paper")
    con = contrastive_loss(sf, so, ys, yt, temperature=TEMPERATURE, variant="paper")
    return proto, con


def fused_terms(es, et, concepts, ys, yt) -> tuple[torch.Tensor, torch.Tensor]:
    from multieye_dist.model.kernels import fused_distill

    return fused_distill(
        es, et, concepts, ys, yt, num_classes=CLASSES, temperature=TEMPERATURE
    )  # fmt: skip


def make_inputs(n: int, k: int, d: int, dtype: torch.dtype, device: str) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(n)

    def emb() -> torch.Tensor:
        v = F.normalize(torch.randn(n, d, generator=g), dim=1)  # level 1: unit norm
        u = torch.randn(n, d, generator=g) / math.sqrt(d)  # level 2: free
        return torch.stack([v, u], 1).to(device=device, dtype=dtype)

    es, et = emb().requires_grad_(), emb()
    concepts = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device=device, dtype=dtype)
    ys = torch.randint(0, CLASSES, (n,), generator=g).to(device)
    yt = torch.randint(0, CLASSES, (n,), generator=g).to(device)
    return es, et, concepts, ys, yt


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn: Callable, inputs: tuple) -> tuple[float, float]:
    es = inputs[0]
    es.grad = None
    proto, con = fn(*inputs)
    (BETA * proto + ALPHA * con).backward()
    return float(proto.detach()), float(con.detach())


def measure(fn: Callable, inputs: tuple, device: str, warmup: int, repeat: int) -> Result:
    """Forward + backward time (median, ms) and step memory (MiB) of one method."""
    res = Result()
    try:
        for _ in range(warmup):
            _step(fn, inputs)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        res.terms = _step(fn, inputs)
        _sync(device)
        if device == "cuda":
            res.mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(repeat):
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                _step(fn, inputs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                _step(fn, inputs)
                times.append((time.perf_counter() - t0) * 1e3)
        res.ms = statistics.median(times) if times else None
    except Exception as exc:  # noqa: BLE001 - a failed case is a table entry, not a crash
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        res.status = "OOM" if oom else "error"
        res.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        logger.warning("%s", res.notes[-1])
    finally:
        inputs[0].grad = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def _fmt(x: float | None, spec: str, res: Result | None = None) -> str:
    if res is not None and res.status != "ok":
        return res.status
    return "n/a" if x is None else format(x, spec)


def _ratio(a: Result, b: Result, attr: str) -> str:
    x, y = getattr(a, attr), getattr(b, attr)
    if a.status != "ok" or b.status != "ok" or x is None or y is None or y <= 0:
        return "-"
    return f"{x / y:.1f}x"


def _agreement(ref: Result, res: Result) -> str:
    if ref.terms is None or res.terms is None:
        return "-"
    errs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(res.terms, ref.terms, strict=True)]
    return f"{max(errs):.1e}"


def table(rows: list[tuple[int, dict[str, Result]]], methods: list[str]) -> str:
    head = ["N", "anchors/level"]
    head += [f"{m} ms" for m in methods] + [f"{m} MiB" for m in methods]
    head += ["triton vs eager (time)", "triton vs compile (time)", "eager/triton (memory)"]
    head += ["rel. diff of terms vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    empty = Result(status="-")
    for n, res in rows:
        tri, eag, com = (res.get(m, empty) for m in ("triton", "eager", "compile"))
        cells = [str(n), str(2 * n)]
        cells += [_fmt(res[m].ms, ".3f", res[m]) for m in methods]
        cells += [_fmt(res[m].mib, ".1f", res[m]) for m in methods]
        cells += [_ratio(eag, tri, "ms"), _ratio(com, tri, "ms"), _ratio(eag, tri, "mib")]
        cells.append(_agreement(eag, tri))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--sizes", help="batch sizes N (default 64,512,4096,16384,65536; cpu 8,24)")
    p.add_argument("--k", type=int, help="concepts K (default 98; cpu 10)")
    p.add_argument("--d", type=int, help="embedding dim D (default 512; cpu 16)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--methods", help="comma list of eager,compile,triton (cpu default: no compile)")
    p.add_argument("--repeat", type=int, help="timed steps per case (default 10; cpu 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; cpu 1)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.sizes = [
        int(s) for s in (args.sizes or ("8,24" if cpu else "64,512,4096,16384,65536")).split(",")
    ]
    args.repeat = args.repeat if args.repeat is not None else (2 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.k = args.k or (10 if cpu else 98)
    args.d = args.d or (16 if cpu else 512)
    args.methods = (args.methods or ("eager,triton" if cpu else "eager,compile,triton")).split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if args.device == "cpu":
        # The Triton kernels run on CPU only under the interpreter (slow: a correctness smoke test).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for the interpreter smoke test")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    fns: dict[str, Callable] = {"eager": reference_terms, "triton": fused_terms}
    if "compile" in args.methods:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        fns["compile"] = torch.compile(reference_terms, dynamic=False)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    logger.info(
        "device %s, torch %s, K=%d D=%d %s", device_name, torch.__version__, args.k, args.d, dtype
    )
    rows = []
    for n in args.sizes:
        inputs = make_inputs(n, args.k, args.d, dtype, args.device)
        res = {}
        for m in args.methods:
            res[m] = measure(fns[m], inputs, args.device, args.warmup, args.repeat)
            r = res[m]
            logger.info("N=%d %s: %s ms, %s MiB", n, m, _fmt(r.ms, ".3f", r), _fmt(r.mib, ".1f", r))
        rows.append((n, res))
        del inputs
    print(table(rows, args.methods), flush=True)


if __name__ == "__main__":
    main()
