"""DeepSpeed precision modes for the student step: speed, memory and agreement with fp32.

One process (a world of one), the real engine from ``multieye_dist.train.engine`` around the real
ConceptModel, the OCT-CoDA loss against a fixed frozen teacher, identical initial weights and
identical batches for every mode. For each ``train.precision`` it reports the step time (median
after warm-up) and its ratio to fp32, peak GPU memory (CUDA only), and how far the loss curve
and the BatchNorm running variance drift from the fp32 run after the same steps.

    python benchmarks/bench_precision.py                       # CPU: resnet18, 64 px, batch 16
    python benchmarks/bench_precision.py --device cuda --backbone resnet50 --image-size 512 \
        --batch-size 64 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from multieye_dist.config import DeepSpeedConfig, OptimConfig
from multieye_dist.core.distributed import DistEnv
from multieye_dist.model.concept_model import ConceptModel, FrozenTeacher, ModelConfig
from multieye_dist.model.concepts import load_bank
from multieye_dist.model.losses import octcoda_loss
from multieye_dist.train import engine as E

BANK = Path(__file__).resolve().parents[1] / "configs/concepts/minilm-l6.safetensors"
MODES = ("fp32", "autocast-bf16", "bf16")


def run_mode(mode: str, args, bank, batches, teacher) -> dict:
    torch.manual_seed(0)
    model = ConceptModel(ModelConfig(backbone=args.backbone), bank).to(args.device)
    engine = E.build_engine(
        model,
        optim=OptimConfig(lr=1e-4, warmup_epochs=0),
        ds=DeepSpeedConfig(zero_stage=args.zero_stage),
        precision=mode,
        micro_batch=args.batch_size,
        world=1,
        steps_per_epoch=args.steps,
        epochs=1,
    )
    dtype = next(engine.module.parameters()).dtype
    if args.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for xf, yf, xo, yo in batches:
        t0 = time.perf_counter()
        zo, so = teacher(xo)
        logits, sims = engine(xf.to(dtype))
        out = octcoda_loss(logits, sims, yf, zo, so, yo)
        engine.backward(out.total)
        engine.step()
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.total.item())
    bn = [
        m.running_var.float().clone()
        for m in engine.module.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.type == "cuda" else None
    return {
        "ms": 1000 * statistics.median(times[args.warmup :]),
        "peak_mib": peak,
        "losses": losses,
        "bn_var": bn,
    }


def table(results: dict) -> str:
    base = results["fp32"]
    lines = [
        f"{'precision':<15}{'ms/step':>10}{'vs fp32':>9}{'peak MiB':>10}"
        f"{'max |dloss|/loss':>18}{'BN var rel.err':>16}",
    ]
    for mode, r in results.items():
        dloss = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"], strict=True))
        bn_err = max(
            ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item()
            for a, b in zip(r["bn_var"], base["bn_var"], strict=True)
        )
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(
            f"{mode:<15}{r['ms']:>10.1f}{base['ms'] / r['ms']:>8.2f}x{peak:>10}"
            f"{dloss:>18.2e}{bn_err:>16.2e}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=1)
    args = p.parse_args()
    env = DistEnv(0, 1, 0, "127.0.0.1", 29500 + os.getpid() % 1000)
    E.init_distributed(env, args.device)
    bank, _, _ = load_bank(BANK)
    g = torch.Generator().manual_seed(1)
    s, b = args.image_size, args.batch_size
    batches = [
        (torch.randn(b, 3, s, s, generator=g).to(args.device),
         torch.randint(0, 9, (b,), generator=g).to(args.device),
         torch.randn(b, 3, s, s, generator=g).to(args.device),
         torch.randint(0, 9, (b,), generator=g).to(args.device))
        for _ in range(args.steps)
    ]  # fmt: skip
    torch.manual_seed(2)
    t = ConceptModel(ModelConfig(backbone=args.backbone), bank).to(args.device)
    teacher = FrozenTeacher(t, dtype=torch.bfloat16)
    results = {mode: run_mode(mode, args, bank, batches, teacher) for mode in MODES}
    print(
        f"\nstudent step, {args.backbone} {s}px batch {b}, ZeRO {args.zero_stage}, "
        f"{args.steps} steps ({args.warmup} warm-up), device {args.device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(results))


if __name__ == "__main__":
    main()
