"""The fast path of the step (perf.*): each switch changes speed, never the numbers, and the
step benchmark runs (a tiny CPU smoke run of every row)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multieye_dist.concepts import load_bank
from multieye_dist.config import load_config
from multieye_dist.data.prefetch import DevicePrefetcher
from multieye_dist.losses import octcoda_loss
from multieye_dist.model import ConceptModel, FrozenTeacher, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "configs" / "concepts" / "minilm-l6.safetensors"


def _models():
    bank = load_bank(BANK)[0]
    torch.manual_seed(0)
    return ConceptModel(ModelConfig(backbone="test_resnet"), bank), bank


def test_perf_section_defaults_and_overrides():
    cfg = load_config(None)
    assert (cfg.perf.channels_last, cfg.perf.compile) == (True, False)
    assert cfg.perf.teacher_inference_mode and cfg.perf.prefetch
    assert load_config(None, ["perf.compile=true"]).perf.compile
    with pytest.raises(ValueError, match="did you mean perf.prefetch"):
        load_config(None, ["perf.prefech=true"])


def test_teacher_in_inference_mode_gives_the_same_usable_outputs():
    """inference_mode outputs are cloned out of it: equal to no_grad's, and a loss that saves
    them for backward (the contrastive product with student sims) still backpropagates."""
    model, _ = _models()
    x = torch.randn(6, 3, 32, 32)
    plain = FrozenTeacher(model)(x)
    fast_teacher = FrozenTeacher(model, inference_mode=True)
    fast = fast_teacher(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast, strict=True))
    assert not any(t.is_inference() for t in fast)
    assert torch.equal(fast_teacher.embeddings(x)[1], FrozenTeacher(model).embeddings(x)[1])
    student, _ = _models()
    zf, sf = student(x)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    out = octcoda_loss(zf, sf, y, *fast, y)
    out.total.backward()
    assert student.proj.weight.grad is not None
    # train_level2 needs autograd through W_4: inference mode is then refused silently off
    assert not FrozenTeacher(model, train_level2=True, inference_mode=True).inference_mode


def test_channels_last_changes_layout_not_results():
    model, _ = _models()
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)[0]
    fast = model.to(memory_format=torch.channels_last)
    out = fast(x.to(memory_format=torch.channels_last))[0]
    assert torch.allclose(ref, out, atol=1e-5)


def test_prefetcher_passes_batches_through_on_cpu():
    batches = [{"x": torch.full((2,), float(i)), "k": [str(i)]} for i in range(5)]
    pre = DevicePrefetcher(batches, torch.device("cpu"))
    assert not pre.enabled and len(pre) == 5
    assert [b["k"] for b in pre] == [[str(i)] for i in range(5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetcher_moves_every_batch_in_order_on_gpu():
    batches = [{"x": torch.full((1000,), float(i)).pin_memory(), "k": i} for i in range(7)]
    got = list(DevicePrefetcher(batches, torch.device("cuda")))
    assert [b["k"] for b in got] == list(range(7))
    assert all(b["x"].is_cuda and float(b["x"][0]) == i for i, b in enumerate(got))


def test_step_benchmark_smoke_run_on_cpu(wandb_home):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--device", "cpu", "--smoke"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("pairs/s") :]
    for row in (
        "release-style baseline",
        "ours (all on)",
        "- channels-last",
        "- teacher inference_mode",
        "ours, real loader",
    ):
        assert row in table, row
