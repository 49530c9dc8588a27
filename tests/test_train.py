"""DeepSpeed training end to end: real ranks started by torchrun (gloo on CPU), real shards,
W&B offline. A tiny timm model (test_resnet, 0.4 M parameters) at 32 px keeps each launch short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, offline_runs, train_losses, wandb_contents, wandb_exit_code

from multieye_dist.cli import main
from multieye_dist.model.checkpoint import load_inference
from multieye_dist.model.concept_model import ConceptModel, ModelConfig
from multieye_dist.model.concepts import load_bank
from multieye_dist.track.records import RUN_ID_FILE, SUMMARY_FILE, read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "configs" / "concepts" / "minilm-l6.safetensors"
STEPS_PER_EPOCH = 8  # 128 samples / 2 ranks / batch 8


def _overrides(shards: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "model.backbone=test_resnet",
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.samples_per_epoch=128",
        "data.num_workers=0",
        "data.augment=false",
        "train.epochs=2",
        f"train.out_dir={out}",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=100",
        "train.precision=fp32",
        "train.progress=false",
        "train.plots=false",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0",
        "teacher.dtype=fp32",
        f"teacher.checkpoint={teacher}",
        "tracking.backend=wandb",
        "tracking.wandb.mode=offline",
        *extra,
    ]


def launch(stage: str, overrides: list[str], env_extra: dict, nproc: int = 2, timeout=300):
    """`multieye-dist train <stage>` on `nproc` CPU ranks through torchrun."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "multieye_dist.cli", "train", stage, *overrides,
    ]  # fmt: skip
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def full_run(shards, teacher_ckpt, wandb_home, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank OCT-CoDA run: 2 epochs x 8 steps."""
    out = tmp_path_factory.mktemp("full") / "run"
    proc = launch("distill", _overrides(shards, out, teacher_ckpt), wandb_home)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_rank_distillation_finishes_with_finite_decreasing_loss(full_run):
    losses = train_losses(full_run)
    assert sorted(losses) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    values = np.array([losses[s] for s in sorted(losses)])
    assert np.isfinite(values).all()
    assert values[-4:].mean() < values[:4].mean(), values  # it learns something
    records = read_metrics(full_run)
    distill = [r for r in records if "train/contrastive" in r]
    assert any(r["train/contrastive"] > 0 for r in distill)  # the distillation term is computed
    assert all(0.0 <= r["train/gate_open"] <= 1.0 for r in distill)
    assert any("dev/f1" in r for r in records)
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["step"] == 2 * STEPS_PER_EPOCH
    for name in ("best", "last"):
        assert 0.0 <= summary[f"test/{name}/f1"] <= 1.0
        assert (full_run / "eval" / f"test_{name}.json").is_file()
    assert (full_run / "config.yaml").is_file()


def test_learning_rate_follows_the_cosine_schedule(full_run):
    lrs = [r["train/lr"] for r in read_metrics(full_run) if "train/lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 2e-3
    assert lrs[-1] == pytest.approx(1e-6)  # optim.min_lr at the last step


def test_resume_after_a_stop_reproduces_the_uninterrupted_run(
    full_run, shards, teacher_ckpt, wandb_home, tmp_path
):
    """Stop after 5 steps (mid-epoch 1), resume: steps 6..16 must repeat the uninterrupted
    run's losses. Same arithmetic in the same order on CPU (gloo reductions are deterministic,
    1 thread per rank), so they agree to float32 rounding; 1e-5 relative leaves room only for
    summation-order noise, far below what a wrong batch, learning rate or weight would give
    (those change the loss in the second or third digit)."""
    out = tmp_path / "run"
    first = launch(
        "distill", _overrides(shards, out, teacher_ckpt, "train.stop_after_steps=5"), wandb_home
    )
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000005"
    run_id = (out / RUN_ID_FILE).read_text().strip()
    second = launch(
        "distill", _overrides(shards, out, teacher_ckpt, "train.keep_checkpoints=1"), wandb_home
    )
    assert second.returncode == 0, second.stderr[-4000:]
    # keep_checkpoints=1: the step-5 and epoch-1 checkpoints were deleted, the last one kept
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == [f"step{2 * STEPS_PER_EPOCH:08d}"], kept

    expected, got = train_losses(full_run), train_losses(out)
    assert sorted(got) == sorted(expected)  # no step lost or repeated
    for step in range(6, 2 * STEPS_PER_EPOCH + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    lrs_a = {r["step"]: r["train/lr"] for r in read_metrics(full_run) if "train/lr" in r}
    lrs_b = {r["step"]: r["train/lr"] for r in read_metrics(out) if "train/lr" in r}
    assert lrs_a == pytest.approx(lrs_b, rel=1e-9)
    # One W&B run across the stop: the same id, two offline parts.
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    assert len(offline_runs(out, run_id)) == 2


def test_wandb_offline_files_hold_the_logged_keys(full_run):
    run_id = (full_run / RUN_ID_FILE).read_text().strip()
    (path,) = offline_runs(full_run, run_id)
    contents = wandb_contents(path)
    for key in (
        "train/loss",
        "train/cls",
        "train/prototype",
        "train/contrastive",
        "train/gate_open",
        "train/lr",
        "train/samples_per_s",
        "dev/f1",
        "dev/auc",
        "dev/kappa",
    ):
        assert key in contents["history"], key
    for table in ("dev/per_class", "dev/confusion_matrix_table", "dev/confusion_counts"):
        assert f"{table}/_type" in contents["history"], table  # tables are nested keys
    assert "test/best/f1" in contents["summary"]
    assert contents["run"].run_id == run_id


def test_inference_export_reloads_and_scores_without_deepspeed(full_run, shards, capsys):
    model, meta = load_inference(full_run / "best.safetensors")
    assert meta["extra"]["config"]["model"]["backbone"] == "test_resnet"
    assert meta["extra"]["modality"] == "fundus" and meta["image_size"] == 32
    assert len(meta["concept_sentences"]) == model.num_concepts == 98
    out_json = full_run / "eval_cli.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(full_run / "best.safetensors"),
                "--shards",
                str(shards),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "fundus-test" in printed and "Macro" in printed
    cli = json.loads(out_json.read_text())
    trained = json.loads((full_run / "eval" / "test_best.json").read_text())
    assert cli["n"] == trained["n"] == 18
    assert cli["f1"] == pytest.approx(trained["f1"], abs=1e-6)  # same model, same samples
    assert cli["confusion_matrix"] == trained["confusion_matrix"]


def test_teacher_stage_then_bf16_zero2_student(shards, wandb_home, tmp_path):
    """One rank: the OCT teacher with train_level2 (W_4 must move), then a student that
    distils from its export in DeepSpeed's bf16 mode under ZeRO stage 2."""
    teacher_dir = tmp_path / "teacher"
    over = _overrides(
        shards,
        teacher_dir,
        Path("unused"),
        "train.epochs=1",
        "teacher.train_level2=true",
        "data.samples_per_epoch=64",
    )
    over = [o for o in over if not o.startswith("teacher.checkpoint")]
    proc = launch("teacher", over, wandb_home, nproc=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, meta = load_inference(teacher_dir / "last.safetensors")
    assert meta["extra"]["modality"] == "oct"
    torch.manual_seed(0)  # the trainer's initial weights: seed 0, built the same way
    init = ConceptModel(ModelConfig(backbone="test_resnet"), load_bank(BANK)[0])
    assert not torch.equal(model.level2.weight, init.level2.weight)

    student_dir = tmp_path / "student"
    over = _overrides(
        shards,
        student_dir,
        teacher_dir / "best.safetensors",
        "train.epochs=1",
        "train.precision=bf16",
        "deepspeed.zero_stage=2",
        "data.samples_per_epoch=64",
    )
    proc = launch("distill", over, wandb_home, nproc=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = train_losses(student_dir)
    assert len(losses) == 8 and np.isfinite(list(losses.values())).all()
    exported, _ = load_inference(student_dir / "last.safetensors")
    assert exported.proj.weight.dtype == torch.float32


def test_nonfinite_losses_are_skipped_then_stop_the_run(shards, teacher_ckpt, wandb_home, tmp_path):
    """A learning rate of 1e30 blows the weights up after one step: every later loss is
    non-finite, each skip is counted, and the third in a row stops the run with exit 1. The
    error ends the tracker's run as failed: exit code 1 in W&B's offline run and in
    summary.json, the metrics log whole."""
    out = tmp_path / "run"
    over = _overrides(
        shards,
        out,
        teacher_ckpt,
        "optim.lr=1e30",
        "optim.min_lr=1e30",
        "optim.max_nonfinite_in_row=3",
        "loss.name=fundus-only",
    )
    proc = launch("distill", over, wandb_home, nproc=1)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 non-finite losses in a row" in proc.stderr
    assert "optim.max_nonfinite_in_row=3" in proc.stderr
    assert proc.stderr.count("non-finite loss at epoch") == 3
    run_id = (out / RUN_ID_FILE).read_text().strip()
    (path,) = offline_runs(out, run_id)
    assert wandb_exit_code(path) == 1
    assert json.loads((out / SUMMARY_FILE).read_text())["exit_code"] == 1
    assert read_metrics(out)  # readable to its last line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "missing.yaml"], "config missing.yaml: no such file (packaged configs"),
        (["optim.lrr=1"], "did you mean optim.lr?"),
        (["train.stage=teacher"], "contradicts the command 'train distill'"),
        (["--resume", "/nonexistent/ckpt"], "not a checkpoint directory"),
        ([], "teacher.checkpoint is not set"),
    ],
)
def test_config_errors_exit_2_with_a_clear_message(
    args, message, shards, tmp_path, capsys, monkeypatch
):
    """Single process, no launcher: errors come before or right after the (1-rank) group."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    base = [
        f"data.shards={shards}",
        f"train.out_dir={tmp_path / 'run'}",
        "tracking.backend=local",
        "model.backbone=test_resnet",
        "data.samples_per_epoch=16",
        "data.batch_size=8",
    ]
    assert main(["train", "distill", *args, *base]) == 2
    assert message in capsys.readouterr().err


def test_fused_triton_loss_trains_like_the_torch_loss(shards, teacher_ckpt, wandb_home, tmp_path):
    """loss.impl=triton (the fused kernel, through Triton's interpreter on CPU) against
    loss.impl=torch on the same run: the first step sees the same weights and batch, so the
    losses agree to float32 rounding; later steps may drift by the kernel's atomic adds."""
    losses = {}
    for impl in ("torch", "triton"):
        over = _overrides(
            shards,
            tmp_path / impl,
            teacher_ckpt,
            "train.epochs=1",
            "data.samples_per_epoch=32",
            f"loss.impl={impl}",
        )
        proc = launch("distill", over, {**wandb_home, "TRITON_INTERPRET": "1"}, nproc=1)
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses[impl] = train_losses(tmp_path / impl)
    assert sorted(losses["triton"]) == sorted(losses["torch"]) == [1, 2, 3, 4]
    assert losses["triton"][1] == pytest.approx(losses["torch"][1], rel=1e-4)
    assert np.isfinite(list(losses["triton"].values())).all()
