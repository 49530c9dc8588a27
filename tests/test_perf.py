"""The fast path of the step (perf.*): each switch changes speed, never the numbers. (The step
benchmark's CPU smoke run of every row is the GPU kit's dry run: tests/test_gpu_kit.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_batch

from multieye_dist.config import load_config
from multieye_dist.data.prefetch import DevicePrefetcher
from multieye_dist.model.concept_model import ConceptModel, FrozenTeacher, ModelConfig
from multieye_dist.model.concepts import load_bank
from multieye_dist.model.losses import octcoda_loss
from multieye_dist.train.objectives import build_objective

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


def test_channels_last_changes_layout_not_results():
    """Through the project's own input path: the objective lays out student and teacher
    inputs (NHWC under perf.channels_last) and the loss is the same either way."""
    model, _ = _models()
    teacher = FrozenTeacher(_models()[0], dtype=torch.float32)
    batch, cpu = random_batch(seed=0), torch.device("cpu")
    results, layouts = [], []
    for on in (False, True):
        cfg = load_config(None, [f"perf.channels_last={str(on).lower()}", "loss.impl=torch"])
        objective = build_objective(cfg, cpu)
        x = objective.inputs(batch.image)
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        results.append(objective(model, teacher, batch))
    assert layouts == [False, True]
    (ref, ref_terms), (fast, fast_terms) = results
    assert torch.allclose(ref, fast, atol=1e-5)
    for k in ref_terms:
        assert torch.allclose(ref_terms[k], fast_terms[k], atol=1e-5), k


def test_prefetcher_passes_batches_through_on_cpu():
    batches = [random_batch(seed=i) for i in range(5)]
    pre = DevicePrefetcher(batches, torch.device("cpu"))
    assert not pre.enabled and len(pre) == 5
    assert [b.keys for b in pre] == [b.keys for b in batches]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetcher_moves_every_batch_in_order_on_gpu():
    batches = [random_batch(seed=i).pin_memory() for i in range(7)]
    got = list(DevicePrefetcher(batches, torch.device("cuda")))
    assert [b.keys for b in got] == [b.keys for b in batches]
    for want, b in zip(batches, got, strict=True):
        assert b.image.is_cuda and b.partner_label.is_cuda
        assert torch.equal(b.image.cpu(), want.image) and torch.equal(b.label.cpu(), want.label)
