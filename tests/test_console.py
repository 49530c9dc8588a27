"""What a person running a training reads and keeps (issue 17, part H): no silent data default,
the console's lines (start, every log step, the progress bar, the closing line), config.yaml's
absolute paths and provenance, output modes under the umask, the checkpoints kept, the devices
of eval/explain, DeepSpeed's first-run compile announced.

One real single-process training (``python -m multieye_dist.cli train distill``, as a user
starts it, under umask 022) is shared by the slow tests through a module fixture."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multieye_dist.cli import main
from multieye_dist.config import Config, load_config, provenance, save_resolved

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STEPS_PER_EPOCH, EPOCHS, LOG_EVERY = 8, 2, 4  # 64 samples / batch 8, one rank


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def console_run(shards, teacher_ckpt, tmp_path_factory):
    """A 2-epoch OCT-CoDA run (16 steps, a log line every 4, a checkpoint every 4, the default
    train.keep_checkpoints), progress bar on, from another working directory, umask 022."""
    out = tmp_path_factory.mktemp("console") / "run"
    cwd = tmp_path_factory.mktemp("elsewhere")
    cmd = [
        sys.executable, "-m", "multieye_dist.cli", "train", "distill",
        "model.backbone=test_resnet", f"data.shards={shards}", "data.image_size=32",
        "data.batch_size=8", "data.samples_per_epoch=64", "data.num_workers=0",
        "data.augment=false", f"train.epochs={EPOCHS}", f"train.out_dir={out}",
        f"train.log_every_steps={LOG_EVERY}", "train.checkpoint_every_steps=4",
        "train.precision=fp32", "train.progress=true", "optim.lr=2e-3",
        "optim.warmup_epochs=0", "teacher.dtype=fp32", f"teacher.checkpoint={teacher_ckpt}",
        "tracking.backend=local",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, umask=0o022
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "seconds": t0}


# ----------------------------------------------------------------------------- the console


@pytest.mark.slow
def test_first_lines_name_shards_with_counts_device_ranks_precision(console_run, shards):
    err = console_run["stderr"]
    counts = {
        m: json.loads((shards / f"{m}-train.manifest.json").read_text())["num_samples"]
        for m in ("fundus", "oct")
    }
    shard_line = re.search(r"INFO .*shards (\S+): fundus train (\d+) samples.*oct train (\d+)", err)
    assert shard_line, err[:3000]
    assert Path(shard_line.group(1)) == shards.resolve()
    assert (int(shard_line.group(2)), int(shard_line.group(3))) == (counts["fundus"], counts["oct"])
    assert re.search(r"1 rank\(s\) on cpu, precision fp32", err)
    first_info = [line for line in err.splitlines() if " INFO " in line][:3]
    assert any("shards" in line for line in first_info), first_info
    # Library notices stay below the console: DeepSpeed's INFO logs and its print()s.
    assert "DeepSpeed" not in console_run["stdout"] and "[INFO]" not in err
    assert "built successfully" not in console_run["stdout"] + err


@pytest.mark.slow
def test_a_line_at_every_log_step_with_terms_lr_pace_wait_eta(console_run):
    err = console_run["stderr"]
    total = EPOCHS * STEPS_PER_EPOCH
    pattern = re.compile(
        rf"INFO .*epoch (\d)/{EPOCHS} step (\d+)/{total} \| loss (\S+) ((?:\w+ \S+ ?)*)\| "
        r"lr (\S+) \| (\S+) pairs/s \| data wait (\d+)% \| ETA (\S+)"
    )
    lines = pattern.findall(err)
    assert [int(s) for _, s, *_ in lines] == list(range(LOG_EVERY, total + 1, LOG_EVERY)), err
    for epoch, step, loss, terms, lr, pace, wait, eta in lines:
        assert int(epoch) == (int(step) - 1) // STEPS_PER_EPOCH + 1
        assert float(loss) > 0 and float(lr) > 0 and float(pace) > 0
        assert {"cls", "contrastive", "prototype"} <= set(terms.split()[::2])  # every term
        assert 0 <= int(wait) <= 100
        assert re.fullmatch(r"\d+m\d\ds|\dh\d\dm", eta)
    assert lines[-1][-1] == "0m00s"  # the last step: nothing left


@pytest.mark.slow
def test_progress_bar_stays_per_epoch_with_the_loss(console_run):
    err = console_run["stderr"]
    for epoch in range(1, EPOCHS + 1):
        bars = re.findall(rf"distill epoch {epoch}/{EPOCHS}: 100%.*?loss=(\d+\.\d+)", err)
        assert bars, err[-3000:]


@pytest.mark.slow
def test_closing_line_names_best_score_epoch_and_exports(console_run):
    out = console_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    done = re.findall(
        r"INFO .*done: best dev macro-F1 (\S+) at epoch (\d+) -> (\S+)", console_run["stderr"]
    )
    assert len(done) == 1
    f1, epoch, best = done[0]
    assert float(f1) == pytest.approx(100 * summary["best_dev_f1"], abs=0.006)
    assert int(epoch) == summary["best_epoch"]
    assert Path(best) == out.resolve() / "best.safetensors" and Path(best).is_file()
    assert console_run["stderr"].rstrip().splitlines()[-1].count("done:") == 1  # the last line


# ----------------------------------------------------------------------------- files


@pytest.mark.slow
def test_config_yaml_has_absolute_paths_version_and_commit(console_run, shards, teacher_ckpt):
    text = (console_run["out"] / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["data"]["shards"] == str(shards.resolve())
    assert saved["teacher"]["checkpoint"] == str(teacher_ckpt.resolve())
    assert saved["train"]["out_dir"] == str(console_run["out"].resolve())
    bank = Path(saved["concepts"]["bank"])  # the default, relative: found in the package
    assert bank.is_absolute() and bank.is_file()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert re.search(r"^# multieye-dist version: \d+\.\d+", text, re.M)
    assert f"# git commit: {head}\n" in text
    assert load_config(console_run["out"] / "config.yaml").data.shards == str(shards.resolve())


def test_urls_stay_and_no_git_is_no_commit_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git at all
    assert provenance()[1] is None
    cfg = load_config(overrides=["data.shards=http://host/shards", "train.out_dir=run"])
    monkeypatch.chdir(tmp_path)
    path = save_resolved(cfg, tmp_path / "run")
    text = path.read_text()
    assert "# git commit: none (not a git checkout)" in text
    saved = yaml.safe_load(text)
    assert saved["data"]["shards"] == "http://host/shards"
    assert saved["train"]["out_dir"] == str(tmp_path / "run")


@pytest.mark.slow
def test_run_outputs_follow_umask_022(console_run):
    files = [p for p in console_run["out"].rglob("*") if p.is_file()]
    assert any(p.name == "best.safetensors" for p in files) and len(files) > 10
    wrong = {
        str(p.relative_to(console_run["out"])): oct(_mode(p))
        for p in files
        if _mode(p) & 0o666 != 0o644  # zero_to_fp32.py is also executable by its owner
    }
    assert wrong == {}


def test_config_and_export_follow_umask_077(tmp_path, teacher_ckpt):
    from multieye_dist.model.checkpoint import export_inference, load_inference

    old = os.umask(0o077)
    try:
        model, meta = load_inference(teacher_ckpt)
        cfg_path = save_resolved(Config(), tmp_path / "run")
        export = tmp_path / "run" / "best.safetensors"
        export_inference(
            export, model, model.cfg, concept_sentences=meta["concept_sentences"], image_size=32
        )
    finally:
        os.umask(old)
    assert (_mode(cfg_path), _mode(export)) == (0o600, 0o600)


@pytest.mark.slow
def test_keep_checkpoints_default_keeps_two_newest_and_the_best_export(console_run):
    assert Config().train.keep_checkpoints == 2
    ckpts = console_run["out"] / "checkpoints"
    tags = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    last = EPOCHS * STEPS_PER_EPOCH
    assert tags == [f"step{last - 4:08d}", f"step{last:08d}"]  # 4 were saved, every 4 steps
    assert (console_run["out"] / "best.safetensors").is_file()


# ----------------------------------------------------------------------------- data.shards


def test_train_without_data_shards_is_a_config_error(tmp_path, monkeypatch, capsys):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    code = main(["train", "distill", f"train.out_dir={out}", "loss.name=fundus-only"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.shards is not set" in err and "e.g. data.shards=" in err
    assert not out.exists()  # refused before anything was written
    assert Config().data.shards == ""
    assert load_config("demo").data.shards  # the demo names its own


# ----------------------------------------------------------------------------- devices


def _cuda_absent() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_absent(), reason="a GPU is visible: --device cuda is valid here")
@pytest.mark.parametrize("cmd", ["eval", "explain"])
def test_device_cuda_without_a_gpu_names_the_option(cmd, teacher_ckpt, tmp_path, capsys):
    args = ["--shards", str(tmp_path)] if cmd == "eval" else [str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--checkpoint", str(teacher_ckpt), *args, "--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "argument --device: cuda: no CUDA GPU is visible" in err
    assert "use --device cpu or auto" in err


def test_device_spelling_is_checked(teacher_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(teacher_ckpt), "--shards", ".", "--device", "gpu"])
    assert "argument --device: 'gpu': choose auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_and_explain_run_on_the_auto_device(console_run, shards, synth_root, capsys):
    best = console_run["out"] / "best.safetensors"
    assert main(["eval", "--checkpoint", str(best), "--shards", str(shards), "--split", "dev"]) == 0
    assert "macro" in capsys.readouterr().out.lower()
    image = next((synth_root / "assemble/train/ImageData").rglob("*.png"))
    assert main(["explain", "--checkpoint", str(best), str(image), "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained[0]["image"] == str(image) and len(explained[0]["concepts"]) == 5


# ----------------------------------------------------------------------------- the loop's clock


def test_data_wait_is_the_time_spent_waiting_for_batches():
    from multieye_dist.train.outputs import Clock

    def slow_loader():
        for i in range(3):
            time.sleep(0.05)
            yield i

    clock = Clock(start_step=0)
    for _ in clock.timed(slow_loader()):
        time.sleep(0.02)  # the step: not waiting
    assert 0.15 <= clock.wait < 0.2


def test_deepspeed_compile_is_announced_only_when_not_built(tmp_path, monkeypatch):
    from multieye_dist.train.engine import jit_builds_pending

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    pending = jit_builds_pending()
    assert [name for name, _ in pending] == ["deepspeed_shm_comm"]
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.parent.mkdir()
    built.write_bytes(b"\x7fELF")
    assert jit_builds_pending() == []


def test_deepspeed_builds_go_to_this_environments_own_folder(monkeypatch, tmp_path):
    import sys

    from multieye_dist.train.engine import use_own_extensions_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # recorded, so that teardown restores it
    own = use_own_extensions_dir()
    assert own == os.environ["TORCH_EXTENSIONS_DIR"]
    assert own == str(Path(sys.prefix) / "var" / "torch_extensions")  # the venv: writable
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's choice wins
    assert use_own_extensions_dir() == str(tmp_path)
