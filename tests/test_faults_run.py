"""Faults around a run (issue 16, part D): nothing is written into a run directory before the
command is fully checked, one training at a time holds a run directory (train.lock), a resume
keeps its model, concept bank and batch geometry, the launchers check the same before queueing,
SIGTERM and SIGINT save and exit (a second SIGINT aborts), and divergence is stopped by the
non-finite guard. Real files, real processes, real signals; one CPU rank of the tiny test model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, load_script, until

from multieye_dist.cli import main
from multieye_dist.config import ConfigError, check_world, load_config
from multieye_dist.core.runlock import LOCK_FILE, RunLocked, acquire, holder
from multieye_dist.model.checkpoint import export_inference
from multieye_dist.model.concept_model import ConceptModel, ModelConfig
from multieye_dist.model.concepts import load_bank, save_bank
from multieye_dist.track.records import read_metrics
from multieye_dist.train.signals import Interrupted

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "configs" / "concepts" / "minilm-l6.safetensors"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# the launchers need a file; the overrides say the rest
PLAIN = ROOT / "configs" / "distill.yaml"


def _tiny(shards: Path, out: Path, *extra: str) -> list[str]:
    """The tiny fundus-only student of tests/test_train.py: one CPU rank, 8 steps an epoch."""
    return [
        "model.backbone=test_resnet", f"data.shards={shards}", "data.image_size=32",
        "data.batch_size=8", "data.samples_per_epoch=64", "data.num_workers=0",
        "data.augment=false", "train.epochs=200", "train.keep_checkpoints=2",
        f"train.out_dir={out}", "train.log_every_steps=1", "train.checkpoint_every_steps=1000",
        "train.precision=fp32", "train.progress=false", "train.plots=false", "optim.lr=2e-3",
        "optim.warmup_epochs=0", "loss.name=fundus-only", "tracking.backend=local", *extra,
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _start(args: list[str], log: Path, cmd: list[str] | None = None) -> subprocess.Popen:
    """`multieye-dist train distill ARGS` (or `cmd`), stdout and stderr into `log`."""
    cmd = cmd or [sys.executable, "-m", "multieye_dist.cli", "train", "distill"]
    fh = log.open("w")
    return subprocess.Popen([*cmd, *args], stdout=fh, stderr=subprocess.STDOUT, env=_env())


def _finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args[:4]} did not exit within {timeout}s")


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes (and every directory)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_launcher_env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
        ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
        ("optim.lr=.nan", "optim.lr=nan: must be a finite number"),
        ("optim.lr=-1e-3", "optim.lr=-0.001: must be > 0"),
        ("optim.weight_decay=.inf", "optim.weight_decay=inf: must be a finite number"),
        ("optim.lr_scale={classifier: .inf}", "optim.lr_scale={'classifier': inf}: must be a"),
        ("loss.alpha=.inf", "loss.alpha=inf: must be a finite number"),
    ],
)
def test_learning_rates_must_be_finite_and_positive(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_unknown_backbone_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"model.backbone='resnet5O': not a timm model; did you"):
        load_config(overrides=["model.backbone=resnet5O"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "{train_micro_batch_size_per_gpu: 16}",
            "deepspeed.extra.train_micro_batch_size_per_gpu=16 contradicts data.batch_size=8",
        ),
        (
            "{gradient_accumulation_steps: 4}",
            "deepspeed.extra.gradient_accumulation_steps=4 contradicts optim.grad_accum=1",
        ),
        (
            "{zero_optimization: {stage: 2}}",
            "deepspeed.extra.zero_optimization.stage=2 contradicts deepspeed.zero_stage=1",
        ),
        ("{train_batch_size: 12}", "deepspeed.extra.train_batch_size=12: must be data.batch_size"),
    ],
)
def test_deepspeed_extra_must_agree_with_the_batch_geometry(extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.batch_size=8", f"deepspeed.extra={extra}"])
    assert message in str(err.value)


def test_train_batch_size_in_deepspeed_extra_must_match_the_ranks():
    cfg = load_config(overrides=["data.batch_size=8", "deepspeed.extra={train_batch_size: 16}"])
    check_world(cfg, 2)  # 8 x 1 x 2
    with pytest.raises(ConfigError, match=r"8 x optim.grad_accum=1 x 1 rank\(s\) = 8.*launch 2"):
        check_world(cfg, 1)


# ----------------------------------------------------------------------------- the lock


_HOLD = (
    "import os, signal, sys, time\n"
    "from multieye_dist.core.runlock import acquire\n"
    "lock = acquire(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "if sys.argv[2] == 'die':\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "time.sleep(60)\n"
)


def _holder(run_dir: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir), how], stdout=subprocess.PIPE, text=True
    )
    if how == "hold":
        assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_holder_is_named_and_its_lock_left_alone(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir, "hold")
    try:
        before = (run_dir / LOCK_FILE).read_bytes()
        with pytest.raises(RunLocked) as err:
            acquire(run_dir)
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {proc.pid}" in message
        assert f"{run_dir} is in use" in message and "another train.out_dir" in message
        assert holder(run_dir)["pid"] == proc.pid
        assert (run_dir / LOCK_FILE).read_bytes() == before  # not rewritten, not removed
    finally:
        proc.kill()
        proc.wait()
    assert holder(run_dir) is None  # the kernel dropped the dead holder's flock


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir, "die")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="multieye_dist.core.runlock"):
        lock = acquire(run_dir)
    (record,) = caplog.records
    assert f"taking over a stale lock of host {socket.gethostname()}, pid {proc.pid}" in (
        record.getMessage()
    )
    assert f"no process {proc.pid} on this host" in record.getMessage()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLocked):  # held: a second open file description is refused
        acquire(run_dir)
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()
    acquire(run_dir).release()  # free again


# ----------------------------------------------------------------------------- signals


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)  # a real signal; Python runs its handler at the next bytecode
    time.sleep(0.05)


def test_stop_flag_takes_sigterm_then_aborts_on_a_second_sigint(caplog):
    """The flag of `multieye-dist train`: SIGTERM is recorded (and logged at the loop's poll,
    not in the handler); a SIGINT after it raises KeyboardInterrupt and leaves SIGINT's default
    action for a third; the previous handlers come back after."""
    from multieye_dist.train.signals import StopFlag, handle_stop_signals

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    flag = StopFlag()
    with caplog.at_level(logging.WARNING, logger="multieye_dist.cluster.submit"):
        with handle_stop_signals(flag):
            _deliver(signal.SIGTERM)
            assert (flag.name, caplog.records) == ("SIGTERM", [])
            assert flag() is True and flag() is True
            with pytest.raises(KeyboardInterrupt):
                _deliver(signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert [r.getMessage() for r in caplog.records] == [
        "caught SIGTERM: saving a checkpoint at the next step, then exiting (Ctrl-C again to "
        "abort without saving)"
    ]


@pytest.fixture(scope="module")
def stopped_run(shards, tmp_path_factory) -> dict:
    """A real run stopped by SIGTERM: it saves at the next step and exits 143. While it trains,
    a second training into its directory (here, in this process) is refused naming it."""
    tmp = tmp_path_factory.mktemp("sigterm")
    out = tmp / "run"
    proc = _start(_tiny(shards, out), tmp / "train.log")
    try:
        until("the first step", lambda: (out / "metrics.jsonl").is_file() and _steps(out), 120)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
            for k in ENV_KEYS:
                mp.delenv(k, raising=False)
            second = (main(["train", "distill", *_tiny(shards, out)]), err.getvalue())
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rc = _finish(proc)
    finally:
        proc.kill()
    log = (tmp / "train.log").read_text()
    return {"out": out, "rc": rc, "log": log, "second": second, "alive": alive, "pid": proc.pid}


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_143(stopped_run):
    out, log = stopped_run["out"], stopped_run["log"]
    assert stopped_run["rc"] == 143, log[-3000:]
    assert "caught SIGTERM: saving a checkpoint at the next step" in log
    assert "Traceback" not in log
    step = _steps(out)[-1]  # the step it stopped at is logged, saved and named by latest
    assert f"stopped by SIGTERM at step {step} (checkpoint saved)" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    state = json.loads((out / "checkpoints" / f"step{step:08d}" / "trainer_state.json").read_text())
    assert state["step"] == step
    assert not (out / LOCK_FILE).exists()  # released on the way out


@pytest.mark.slow
def test_second_training_into_a_running_one_is_refused_naming_it(stopped_run):
    rc, err = stopped_run["second"]
    assert rc == 2 and stopped_run["alive"], err
    (line,) = [ln for ln in err.splitlines() if "multieye-dist: error:" in ln]
    assert f"{stopped_run['out']} is in use: another training holds" in line
    assert f"host {socket.gethostname()}, pid {stopped_run['pid']}, since " in line


@pytest.mark.slow
def test_resume_after_sigterm_continues_and_takes_over_a_stale_lock(stopped_run, shards, tmp_path):
    """The stopped run resumes at its checkpoint's step; a lock left by a killed process is
    taken over with a warning. (A copy: the other tests need the stopped run as it is.)"""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped_run["out"], out)
    step = _steps(out)[-1]
    dead = _holder(out, "die")
    dead.wait(timeout=30)
    proc = _start(_tiny(shards, out, "train.stop_after_steps=2"), tmp_path / "resume.log")
    rc = _finish(proc)
    log = (tmp_path / "resume.log").read_text()
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and f"resumed at step {step} (" in log  # the setup's line
    assert f"taking over a stale lock of host {socket.gethostname()}, pid {dead.pid}" in log
    assert _steps(out)[-3:] == [step, step + 1, step + 2]  # none lost, none repeated
    assert (out / "checkpoints" / "latest").read_text() == f"step{step + 2:08d}"
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_second_sigint_aborts_at_once_without_a_traceback(shards, tmp_path):
    """The first SIGINT is taken while the run is still setting up (it would save at its first
    step); the second aborts it there: exit 130, one line, nothing saved, the lock released."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start(_tiny(shards, out), log)
    try:
        until("the setup", lambda: "objectives: objective" in log.read_text(), 120)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = _finish(proc, timeout=60)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert time.monotonic() - t0 < 20
    assert "aborted by a second SIGINT: nothing saved after the last checkpoint" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not (out / "checkpoints").exists() and not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def other_files(tmp_path_factory, teacher_ckpt) -> dict[str, Path]:
    """Real files a command can be given by mistake: a fundus student export, a concept-
    alignment export, a teacher over another concept bank, and that other bank."""
    tmp = tmp_path_factory.mktemp("others")
    bank, sentences, _ = load_bank(BANK)
    cfg = ModelConfig(backbone="test_resnet")
    other = torch.nn.functional.normalize(bank.flip(0), dim=1)  # the same shape, other rows
    save_bank(tmp / "other-bank.safetensors", other, sentences)
    files = {"teacher": teacher_ckpt, "bank": tmp / "other-bank.safetensors"}
    for name, b, extra in (
        ("student", bank, {"modality": "fundus"}),
        ("align", bank, {"modality": "oct", "config": {"train": {"stage": "align"}}}),
        ("other-teacher", other, {"modality": "oct"}),
    ):
        files[name] = tmp / f"{name}.safetensors"
        model = ConceptModel(cfg, b)
        export_inference(
            files[name], model, cfg, concept_sentences=sentences, image_size=32, extra=extra
        )
    return files


REFUSALS = [
    (["optim.lr=.inf"], "optim.lr=inf: must be a finite number"),
    (["model.backbone=resnet5O"], "model.backbone='resnet5O': not a timm model"),
    (["deepspeed.extra={train_batch_size: 16}"], "x 1 rank(s) = 8"),
    (["loss.name=octcoda", "teacher.checkpoint=/nonexistent/t.safetensors"], "no such file"),
    (["loss.name=octcoda", "teacher.checkpoint=STUDENT"], "its export's modality is 'fundus'"),
    (["loss.name=octcoda", "teacher.checkpoint=ALIGN"], "a concept-alignment export"),
    (["loss.name=octcoda", "teacher.checkpoint=OTHER"], "differs from concepts.bank"),
    (["model.weights=/nonexistent/init.pt"], "model.weights=/nonexistent/init.pt: no such file"),
    # a resume with another model, concept bank or batch geometry
    (["model.backbone=resnet18"], "model.backbone 'test_resnet' -> 'resnet18'"),
    (["model.level2_norm=true"], "model.level2_norm False -> True"),
    (["data.batch_size=4"], "data.batch_size 8 -> 4 differ from the run that saved it"),
    # The optimizer step's micro-batches (ranks x grad_accum) must stay: another grad_accum
    # on the same ranks, or 2 ranks for a step of 1 micro-batch, cannot resume the run.
    (["optim.grad_accum=2"], "takes 1 micro-batch(es) (ranks x optim.grad_accum), this run's 2"),
    (["concepts.bank=BANK"], "concepts.bank (content) "),
    (["WORLD_SIZE=2"], "2 rank(s) cannot: use a number of ranks that divides 1 ([1])"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_refused_command_leaves_the_run_directory_byte_identical(
    extra, message, stopped_run, other_files, shards, capsys, monkeypatch, no_launcher_env
):
    """Into the stopped run's directory (which a refusal must not touch, config.yaml above
    all): exit 2, one line naming the key, file or difference, and not one byte changed."""
    names = {"STUDENT": "student", "ALIGN": "align", "OTHER": "other-teacher", "BANK": "bank"}
    for i, item in enumerate(extra):
        key, _, value = item.partition("=")
        if value in names:
            extra = [*extra[:i], f"{key}={other_files[names[value]]}", *extra[i + 1 :]]
    if extra == ["WORLD_SIZE=2"]:  # rank 0 of 2, as a launcher would say: checked before joining
        for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        extra = []
    out = stopped_run["out"]
    before = _tree(out)
    assert main(["train", "distill", *_tiny(shards, out), *extra]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("multieye-dist: error:")]
    assert message in line, err
    assert _tree(out) == before


# ----------------------------------------------------------------------------- launchers


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.batch_size=4"], "data.batch_size 8 -> 4"),
        (["--tasks-per-node", "2"], "2 rank(s) cannot: use a number of ranks that divides 1"),
        (["loss.name=octcoda", "teacher.checkpoint=/nonexistent/t.safetensors"], "no such file"),
        (["optim.lr=.inf"], "optim.lr=inf: must be a finite number"),
    ],
)
def test_submit_checks_as_the_trainer_before_queueing(
    extra, message, stopped_run, shards, capsys, monkeypatch
):
    """launch/submit.py (--local: no cluster needed) refuses what the trainer would refuse,
    with exit 2, before submitit writes its folder: the run directory is not touched."""
    monkeypatch.chdir(ROOT)
    submit = load_script("submit.py", "faults_submit.py")
    out = stopped_run["out"]
    before = _tree(out)
    flags = [e for e in extra if e.startswith("--") or e.isdigit()]
    over = [e for e in extra if e not in flags]
    args = ["--config", str(PLAIN), "--local", *flags, *_tiny(shards, out), *over]
    assert submit.main(args) == 2
    assert message in capsys.readouterr().err
    assert _tree(out) == before


@pytest.mark.slow
def test_submit_refuses_a_run_directory_a_training_holds(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    submit = load_script("submit.py", "faults_submit.py")
    out = tmp_path / "run"
    proc = _holder(out, "hold")
    try:
        before = _tree(out)
        args = ["--config", str(PLAIN), "--local", *_tiny(shards, out)]
        assert submit.main(args) == 2
        err = capsys.readouterr().err
        assert f"is in use: another training holds {out / LOCK_FILE}" in err
        assert f"pid {proc.pid}" in err
        assert _tree(out) == before
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sweep_refuses_an_array_with_one_bad_run_and_writes_nothing(
    shards, teacher_ckpt, tmp_path, capsys, monkeypatch
):
    """Each run is checked as its trainer will check it: one run's teacher export does not
    exist (a config that resolves, a file that is not there), so no run is queued."""
    monkeypatch.chdir(ROOT)
    sweep = load_script("sweep.py", "faults_sweep.py")
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "method: grid\nmetric: {name: dev/f1}\nparameters:\n"
        f"  teacher.checkpoint: {{values: [{teacher_ckpt}, /nonexistent/t.safetensors]}}\n"
    )
    base = [o for o in _tiny(shards, tmp_path / "x") if not o.startswith("train.out_dir")]
    args = ["--sweep", str(spec), "--config", str(PLAIN), "--local", "--out", str(tmp_path / "sw")]
    assert sweep.main([*args, *base, "loss.name=octcoda"]) == 2
    err = capsys.readouterr().err
    assert "sweep: error: run-001 ({'teacher.checkpoint': '/nonexistent/t.safetensors'})" in err
    assert "teacher.checkpoint=/nonexistent/t.safetensors: no such file" in err
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_refusal_leaves_the_run_directory_byte_identical(
    slurm_cluster, stopped_run, shards, capsys, monkeypatch
):
    """A real sbatch refusal (an unknown partition): submitit had already written its batch
    script and pickles into <run>/slurm; they are removed, config.yaml is not rewritten."""
    monkeypatch.chdir(ROOT)
    submit = load_script("submit.py", "faults_submit.py")
    out = stopped_run["out"]
    before = _tree(out)
    args = ["--config", str(PLAIN), "--partition", "nosuchpartition"]
    assert submit.main([*args, *_tiny(shards, out)]) == 2
    assert "invalid partition" in capsys.readouterr().err
    assert _tree(out) == before


# ----------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_divergence_is_stopped_by_the_guard_across_epochs(shards, tmp_path):
    """A huge finite learning rate: one step blows the weights up, every later loss is not
    finite. 4 steps an epoch and a limit of 6: the count goes on over the epoch boundary, where
    the dev evaluation of the diverged model is skipped (not a crash in the metrics), and the
    guard stops the run with its advice: exit 1, the tracker's run marked failed."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    extra = [
        "optim.lr=1e30", "optim.min_lr=1e30", "optim.max_nonfinite_in_row=6",
        "data.samples_per_epoch=32", "train.epochs=3",
    ]  # fmt: skip
    rc = _finish(_start(_tiny(shards, out, *extra), log))
    text = log.read_text()
    assert rc == 1, text[-3000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("multieye-dist: training stopped")]
    assert "6 non-finite losses in a row (optim.max_nonfinite_in_row=6) at epoch 1" in line
    assert "lower optim.lr" in line
    assert "epoch 1: dev evaluation skipped: the model's dev predictions are not finite" in text
    assert "Traceback" not in text
    assert json.loads((out / "summary.json").read_text())["exit_code"] == 1
    assert _steps(out) == [1]  # the one applied step; read_metrics reads every line
    assert (out / "checkpoints" / "latest").is_file() and not (out / LOCK_FILE).exists()


def test_interrupted_is_a_quiet_exit_with_the_signal_status():
    """What a stop signal ends the process with: a SystemExit (no traceback) of 128 + signal."""
    code = (
        "import signal\nfrom multieye_dist.train.signals import Interrupted\n"
        "raise Interrupted(128 + signal.SIGTERM)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (143, "")
    assert issubclass(Interrupted, SystemExit)
