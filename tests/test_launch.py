"""launch/submit.py and launch/sweep.py on the real single-node Slurm cluster: a 2-task DeepSpeed
job, a job preempted by Slurm's warning signal that requeues and resumes, an offline sweep array,
and bad input refused before anything is queued. Without Slurm or the network: the online sweep's
hand-off (a fake agent step injected) and its AgentTask shipped by value, as submitit does."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    launch,
    load_script,
    sacct_state,
    shipped_by_value,
    slurm_tiny,
    submit_two_tasks,
    train_losses,
    train_steps,
    until,
)

from multieye_dist.config import load_config
from multieye_dist.track.records import RUN_ID_FILE, read_run_id
from multieye_dist.track.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # 2 epochs x 128 samples / 2 ranks / batch 8


def test_two_task_deepspeed_job_finishes_and_writes_its_metrics(two_task_job):
    assert train_steps(two_task_job) == list(range(1, STEPS + 1))
    summary = json.loads((two_task_job / "summary.json").read_text())
    assert summary["step"] == STEPS and "test/best/f1" in summary
    assert (two_task_job / "config.yaml").is_file()
    logs = sorted(p.name for p in (two_task_job / "slurm").glob("*_log.err"))
    assert len(logs) == 2  # one per task (rank)
    err = "".join(p.read_text() for p in (two_task_job / "slurm").glob("*_0_log.err"))
    assert "2 rank(s) on cpu" in err


def test_preempted_job_saves_requeues_and_resumes_without_losing_a_step(
    two_task_job,
    slurm_cluster,
    shards,
    wandb_home,
    tmp_path,
):
    """SIGUSR2 (what Slurm sends before a time limit or preemption) mid-run: every rank saves at
    the same step, the job is requeued, and it resumes there in the same W&B run, ending at the
    uninterrupted job's step count with the same losses."""
    out = tmp_path / "run"
    proc = submit_two_tasks(slurm_cluster, shards, out, wandb_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    until(
        "3 training steps",
        lambda: (out / "metrics.jsonl").is_file() and len(train_steps(out)) >= 3,
        timeout=180,
    )
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    until(
        "the requeued job to finish",
        lambda: sacct_state(job_id) == "COMPLETED" and (out / "summary.json").is_file(),
        timeout=300,
    )

    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    assert "Restarts=1" in show.stdout
    steps = train_steps(out)
    assert steps == list(range(1, STEPS + 1))  # none lost, none repeated
    expected = train_losses(two_task_job)
    for step, loss in train_losses(out).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert len(list(out.glob(f"wandb/offline-run-*-{run_id}*"))) == 2
    err = "".join(p.read_text() for p in (out / "slurm").glob(f"{job_id}_0_log.err"))
    assert "stop requested" in err and "resumed from" in err


def test_offline_sweep_array_runs_every_run_and_summarizes(
    slurm_cluster, shards, wandb_home, tmp_path
):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: dev/f1, goal: maximize}\n"
        "parameters:\n  optim.lr: {values: [0.001, 0.003]}\n  loss.alpha: {values: [0.3, 0.6]}\n"
    )
    out = tmp_path / "sweep"
    base = slurm_tiny(shards, tmp_path / "unused", "train.epochs=1", "data.samples_per_epoch=32")
    base = [o for o in base if not o.startswith("train.out_dir")]
    proc = launch(
        "sweep.py",
        "--sweep",
        str(sweep),
        "--config",
        "configs/demo.yaml",
        "--out",
        str(out),
        "--partition",
        slurm_cluster.partition,
        "--time",
        "10",
        "--wait",
        *base,
        env=wandb_home,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "submitted 4 run(s)" in proc.stdout
    manifest = json.loads((out / "sweep.json").read_text())
    assert len({j.split("_")[0] for j in manifest["job_ids"]}) == 1  # one array
    summary = launch("sweep.py", "--summary", str(out), env={})
    assert summary.returncode == 0, summary.stderr
    rows = [ln for ln in summary.stdout.splitlines() if ln.startswith("run-")]
    assert len(rows) == 4
    values = [float(ln.split()[1]) for ln in rows]
    assert values == sorted(values, reverse=True)  # best first
    params = {tuple(r["params"].values()) for r in manifest["runs"]}
    assert params == {(0.001, 0.3), (0.001, 0.6), (0.003, 0.3), (0.003, 0.6)}
    for r in manifest["runs"]:  # each run is named and tagged for the tracker
        tracking = yaml.safe_load((Path(r["out_dir"]) / "config.yaml").read_text())["tracking"]
        assert (tracking["run_name"], tracking["tags"]) == (r["name"], ["tiny"])


def _queue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("submit.py", ["--partition", "nosuchpartition"], "invalid partition"),
        ("submit.py", ["--nodes", "3"], "More processors requested than permitted"),
        ("submit.py", ["--gpus-per-node", "2", "--tasks-per-node", "1"], "one task per GPU"),
        ("submit.py", ["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
        ("sweep.py", ["--sweep", "SWEEP", "--partition", "nosuchpartition"], "invalid partition"),
        ("sweep.py", ["--sweep", "BADSWEEP"], "method='sideways'"),
    ],
)
def test_bad_input_is_refused_before_anything_is_queued(
    script, args, message, slurm_cluster, shards, tmp_path
):
    (tmp_path / "s.yaml").write_text(
        "method: grid\nmetric: {name: dev/f1}\nparameters:\n  optim.lr: {values: [0.001]}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "method: sideways\nmetric: {name: dev/f1}\nparameters:\n  optim.lr: {values: [1]}\n"
    )
    args = [
        {"SWEEP": str(tmp_path / "s.yaml"), "BADSWEEP": str(tmp_path / "b.yaml")}.get(a, a)
        for a in args
    ]
    before = _queue()
    over = [
        o
        for o in slurm_tiny(shards, tmp_path / "run")
        if script == "submit.py" or not o.startswith("train.out_dir")
    ]
    extra = ["--out", str(tmp_path / "sw")] if script == "sweep.py" else []
    proc = launch(script, "--config", "configs/demo.yaml", *extra, *args, *over, env={})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert _queue() == before  # nothing submitted
    assert not (tmp_path / "sw" / "sweep.json").exists()


def test_missing_config_file_is_named(slurm_cluster, tmp_path):
    proc = launch("submit.py", "--config", str(tmp_path / "nope.yaml"), env={})
    assert proc.returncode == 2 and "nope.yaml: no such file" in proc.stderr


# ----------------------------------------------------------------------------- online sweeps


@pytest.fixture(scope="module")
def sweep_launcher():
    """launch/sweep.py as a module."""
    yield load_script("sweep.py", "sweep_launcher")
    del sys.modules["sweep_launcher"]


def test_online_sweep_hand_off_without_the_network(sweep_launcher, tmp_path):
    """The agent step (here a fake: no W&B server) runs once per task, on rank 0; the run id is
    persisted where the Tracker reads it, the other ranks and a requeued task read the same
    hand-off, and the task's overrides resolve to an online W&B run in the run's directory."""
    calls, params = [], {"loss.alpha": 0.3, "optim.lr": 0.001}

    def next_run():
        calls.append(1)
        return "agentrun1", params

    with pytest.raises(RuntimeError, match="no sweep run handed over"):
        sweep_launcher.hand_off(tmp_path, "7_0", 1, next_run, timeout_s=0.2, poll_s=0.05)
    record = sweep_launcher.hand_off(tmp_path, "7_0", 0, next_run)
    out_dir = tmp_path / "runs" / "agentrun1"
    assert record == {"name": "agentrun1", "params": params, "out_dir": str(out_dir)}
    assert read_run_id(out_dir) == "agentrun1"
    assert sweep_launcher.hand_off(tmp_path, "7_0", 1, next_run, poll_s=0.01) == record
    assert sweep_launcher.hand_off(tmp_path, "7_0", 0, next_run) == record  # requeued task
    assert calls == [1]
    assert sorted(p.name for p in (tmp_path / "agents").iterdir()) == ["7_0.json"]
    assert sorted(p.name for p in out_dir.iterdir()) == [RUN_ID_FILE]  # no temp files left

    task = sweep_launcher.AgentTask(
        "sweep1",
        str(ROOT / "configs" / "demo.yaml"),
        ["train.epochs=1"],
        str(tmp_path),
    )
    cfg = load_config(task.config, task.train_overrides(record))
    assert (cfg.tracking.backend, cfg.tracking.wandb.mode) == ("wandb", "online")
    assert (cfg.loss.alpha, cfg.optim.lr, cfg.train.epochs) == (0.3, 0.001, 1)
    assert cfg.train.out_dir == str(out_dir)
    local = dataclasses.replace(cfg.tracking, backend="local")
    tracker = Tracker(local, cfg.train.out_dir, rank=0)  # the training continues that run
    tracker.finish()
    assert tracker.run_id == "agentrun1"


def test_agent_task_is_shipped_by_value(sweep_launcher, tmp_path):
    """Launched, launch/sweep.py is __main__, so cloudpickle (submitit) pickles AgentTask by
    value: a fresh interpreter that cannot import the launcher still loads it, requeues it and
    builds its overrides from what is installed (multieye_dist)."""
    task = sweep_launcher.AgentTask("sweep1", "c.yaml", ["train.epochs=1"], str(tmp_path), 2)
    code = (
        "import pickle, sys\n"
        "task = pickle.loads(sys.stdin.buffer.read())\n"
        "again = task.checkpoint().function\n"
        "assert type(again).__name__ == 'AgentTask' and again.max_requeues == 2\n"
        "print(again.train_overrides({'params': {'loss.alpha': 0.3}, 'out_dir': '/o'}))\n"
    )
    out = shipped_by_value(sweep_launcher, task, code, tmp_path)
    assert out.strip() == str(
        [
            "train.epochs=1",
            "loss.alpha=0.3",
            "train.out_dir=/o",
            "tracking.backend=wandb",
            "tracking.wandb.mode=online",
        ]
    )
