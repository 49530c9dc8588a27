#!/usr/bin/env python
"""Compile the fused distillation kernels ahead of time for real GPUs (no GPU needed) and print
what each needs: shared memory against the chip's limit, registers, spills, the dot instruction.

    .venv/bin/python benchmarks/aot_report.py       # sm_90 + sm_80, bf16 + fp32, K 98 + 256
    .venv/bin/python benchmarks/aot_report.py --arch 90 --dtype bf16 --config 64,64,64,8

The launches are the ones ``fused_distill``'s host code makes for a batch of 512 at D = 512
(``multieye_dist.model.kernels.aot``); ``--config M,N,D,WARPS`` replaces ``LaunchConfig.choose``'s
tile sizes, to try others. ``spills`` is triton's ``n_spills`` (local memory per thread / 4). Exits
1 if a kernel needs more shared memory than the chip has, or a 16-bit dot is off the tensor cores.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=_ints, default=[90, 80], help="compute capabilities (90,80)")
    p.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16,fp16,fp32")
    p.add_argument("--k", type=_ints, default=None, help="concept counts K (default 98,256)")
    p.add_argument("--config", type=_ints, default=None, help="tiles M,N,D,WARPS")
    args = p.parse_args(argv)

    from multieye_dist.model.kernels import LaunchConfig, aot

    config = None
    if args.config:
        if len(args.config) != 4:
            p.error("--config takes BLOCK_M,BLOCK_N,BLOCK_D,NUM_WARPS")
        m, n, d, w = args.config
        config = LaunchConfig(block_m=m, block_n=n, block_d=d, num_warps=w)
    dtypes = [DTYPES[x] for x in args.dtype.split(",")]
    rows = aot.compile_all(args.arch, dtypes, args.k or aot.CONCEPTS, config=config)
    print(
        f"triton {version('triton')}, batch {aot.BATCH}, D {aot.DIM}, {aot.CLASSES} classes; "
        f"tiles {'from --config' if config else 'from LaunchConfig.choose (GPU)'}"
    )
    print(aot.table(rows), flush=True)
    bad = aot.problems(rows)
    for line in bad:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
