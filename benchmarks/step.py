"""The whole distillation step, pairs per second: ours (each fast-path switch on and off) against
a release-style baseline, on tensors already on the device and fed by the real loader.

One step = student forward and backward, teacher forward, OCT-CoDA loss, optimizer step. Ours
is ``multieye_dist.train.loop.train_step`` on the DeepSpeed engine that
``multieye_dist.train.setup.setup`` builds, so the benchmark times the training code itself;
switches are ``perf.*``, ``loss.impl`` and ``train.precision`` overrides. The baseline is the
release's step: fp16 autocast with a grad scaler, NCHW, plain PyTorch AdamW, per-sample Python
loop for the prototypes, eager.

    python benchmarks/step.py                       # GPU: resnet50, 512 px, batch 64
    python benchmarks/step.py --device cpu --smoke  # a tiny CPU run of every row
    python benchmarks/step.py --profile             # + where the time of our step goes
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from multieye_dist.config import load_config
from multieye_dist.data.batch import Batch, StreamStats
from multieye_dist.model.checkpoint import export_inference
from multieye_dist.model.concept_model import ConceptModel, ModelConfig
from multieye_dist.model.concepts import load_bank
from multieye_dist.model.losses import contrastive_loss, distillation_gate

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "configs" / "concepts" / "minilm-l6.safetensors"

# name -> overrides over "everything on" (the defaults of PerfConfig, autocast-bf16, auto loss)
VARIANTS = {
    "ours (all on)": [],
    "  - channels-last": ["perf.channels_last=false"],
    "  - teacher inference_mode": ["perf.teacher_inference_mode=false"],
    "  - fused loss (torch)": ["loss.impl=torch"],
    "  + torch.compile": ["perf.compile=true"],
    "  bf16 weights (DS bf16)": ["train.precision=bf16"],
}


def make_data(root: Path, image_size: int, per_class: int) -> Path:
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert
    from multieye_dist.data.synth import SynthOptions, generate

    generate(root / "raw", SynthOptions(per_class=per_class, image_size=image_size, workers=0))
    opts = ConvertOptions(shard_samples=64, workers=0, preprocess=Preprocess(image_size=image_size))
    convert(root / "raw", root / "shards", opts, progress=False)
    return root / "shards"


def make_teacher(path: Path, backbone: str, image_size: int) -> Path:
    bank, sentences, _ = load_bank(BANK)
    cfg = ModelConfig(backbone=backbone)
    export_inference(  # an untrained OCT teacher: the step's cost, not its result, is measured
        path,
        ConceptModel(cfg, bank),
        cfg,
        concept_sentences=sentences,
        image_size=image_size,
        extra={"modality": "oct"},
    )
    return path


def synthetic_batch(b: int, s: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 9, (b,), generator=g)
    return Batch(
        image=torch.randn(b, 3, s, s, generator=g),
        label=y,
        keys=[f"f{i}" for i in range(b)],
        meta=[{} for _ in range(b)],
        stats=StreamStats(),
        partner_image=torch.randn(b, 3, s, s, generator=g),
        partner_label=y.clone(),
        partner_keys=[f"o{i}" for i in range(b)],
    ).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, device: torch.device, warmup: int) -> tuple[float, float | None]:
    """Median seconds per step after `warmup` steps, and peak GPU MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    it = iter(batches)
    for i, batch in enumerate(it):
        _sync(device)
        t0 = time.perf_counter()
        step(batch)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def timed_loader(step, loader, device: torch.device, warmup: int, steps: int) -> float:
    """Pairs come from the loader: time from the end of warm-up to the last step."""
    it = iter(loader)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(it))
    _sync(device)
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------- baseline


def release_prototype_loss(sf, yf, so, yo) -> torch.Tensor:
    """The release's prototypes: a Python loop over samples, one small op per sample."""
    shared = sorted(set(yf.tolist()) & set(yo.tolist()))
    if not shared:
        return sf.sum() * 0.0
    pf, po = [], []
    for c in shared:
        rows_f = [sf[i] for i in range(sf.shape[0]) if int(yf[i]) == c]
        rows_o = [so[i] for i in range(so.shape[0]) if int(yo[i]) == c]
        pf.append(torch.stack(rows_f).mean(0))
        po.append(torch.stack(rows_o).mean(0))
    return F.mse_loss(torch.stack(pf), torch.stack(po))


def release_step_fn(backbone: str, device: torch.device, image_size: int):
    bank = load_bank(BANK)[0]
    torch.manual_seed(0)
    student = ConceptModel(ModelConfig(backbone=backbone), bank).to(device).train()
    teacher = ConceptModel(ModelConfig(backbone=backbone), bank).to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-3)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.bfloat16  # CPU autocast: bf16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step(batch: Batch) -> None:
        with torch.autocast(device.type, dtype=dtype):
            zf, sf = student(batch.image)
            with torch.no_grad():
                zo, so = teacher(batch.partner_image)
        yf, yo = batch.label, batch.partner_label
        zf, sf, zo, so = zf.float(), sf.float(), zo.float(), so.float()
        loss = F.cross_entropy(zf, yf)
        if bool(distillation_gate(zf, zo, yf)):
            proto = release_prototype_loss(sf, yf, so.detach(), yo)
            con = contrastive_loss(sf, so, yf, yo, temperature=10.0, variant="official")
            distill = 0.05 * proto + 0.6 * con
            if torch.isfinite(distill):
                loss = loss + distill
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


# ----------------------------------------------------------------------------- ours


def our_job(args, shards: Path, teacher: Path, out: Path, overrides: list[str]):
    from multieye_dist.train.setup import setup

    cfg = load_config(ROOT / "configs" / "distill.yaml", [
        f"model.backbone={args.backbone}", f"data.shards={shards}",
        f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
        f"data.samples_per_epoch={args.batch_size * (args.steps + args.warmup + 2)}",
        f"data.num_workers={args.workers}", "data.pool_size=8", f"teacher.checkpoint={teacher}",
        f"train.out_dir={out}", "train.resume=never", "train.progress=false",
        "tracking.backend=local", "optim.warmup_epochs=0", "train.epochs=1", *args.common,
        *overrides,
    ])  # fmt: skip
    job, _ = setup(cfg)
    return job


def profile_step(step, batch, device: torch.device, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        step(batch)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(batch)
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=16, help="loader workers (loader row)")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU check)")
    p.add_argument("--profile", action="store_true", help="profile our step (all on)")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = p.parse_args()
    if args.smoke:
        args.backbone, args.image_size, args.batch_size = "test_resnet", 32, 8
        args.steps, args.warmup, args.workers = 3, 1, 0
    cpu = args.device.type == "cpu"
    # On the CPU: fp32 (CPU bf16 is emulated), no Triton (the interpreter is not a benchmark).
    args.common = ["train.precision=fp32", "loss.impl=torch"] if cpu else []
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    shards = make_data(tmp / "data", args.image_size, per_class=8 if args.smoke else 24)
    teacher = make_teacher(tmp / "teacher.safetensors", args.backbone, args.image_size)
    batch = synthetic_batch(args.batch_size, args.image_size, args.device)
    batches = [batch] * (args.steps + args.warmup)
    rows: list[tuple[str, float, float | None]] = []

    base_s, base_peak = timed(
        release_step_fn(args.backbone, args.device, args.image_size),
        batches,
        args.device,
        args.warmup,
    )
    rows.append(("release-style baseline", base_s, base_peak))
    # Rows are printed as they are measured: a run cut short by a time limit keeps its table.
    print(
        f"\ndistillation step: {args.backbone} student + teacher, {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up, "
        f"device {args.device} ({torch.cuda.get_device_name(args.device) if not cpu else 'cpu'}"
        f"), torch {torch.__version__}"
    )
    print(f"{'step':<36}{'pairs/s':>10}{'ms/step':>10}{'vs baseline':>13}{'peak MiB':>10}")

    def show(name: str, sec: float, peak: float | None) -> None:
        pk = f"{peak:.0f}" if peak is not None else "-"
        print(
            f"{name:<36}{args.batch_size / sec:>10.1f}{1000 * sec:>10.1f}"
            f"{base_s / sec:>12.2f}x{pk:>10}",
            flush=True,
        )

    show(*rows[0])
    from multieye_dist.train.loop import train_step

    wanted = args.only or list(VARIANTS)
    for name, over in VARIANTS.items():
        if name not in wanted or (cpu and name.strip().startswith(("+ torch.compile", "bf16"))):
            continue
        job = our_job(args, shards, teacher, tmp / "runs" / str(len(rows)), over)
        sec, peak = timed(lambda b, job=job: train_step(job, b), batches, args.device, args.warmup)
        rows.append((name, sec, peak))
        show(*rows[-1])
        if name == "ours (all on)":
            from multieye_dist.data.prefetch import DevicePrefetcher

            loader = DevicePrefetcher(job.loader, job.device, job.cfg.perf.prefetch)
            sec_l = timed_loader(
                lambda b, job=job: train_step(job, b), loader, args.device, args.warmup, args.steps
            )
            rows.append((f"ours, real loader ({args.workers} workers)", sec_l, None))
            show(*rows[-1])
            if args.profile:
                print(profile_step(lambda b, job=job: train_step(job, b), batch, args.device))
        del job  # one engine at a time on the device
        if not cpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
