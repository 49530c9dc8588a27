"""Helpers shared by the tests (fixtures live in conftest.py): spawned gloo ranks, free
ports, polling Slurm, and readers of what runs leave behind (metrics, offline W&B files).
Tests import these instead of each other's private functions."""

from __future__ import annotations

import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """Entry point of a spawned rank: a gloo group on loopback around fn(rank, world, *args)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes joined in one gloo group; fail
    the test, killing them, if they outlast `timeout`."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_main,
        args=(world, free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run of {fn.__name__} timed out after {timeout}s")


# ----------------------------------------------------------------------------- .wandb reader

_BLOCK = 32 * 1024  # LevelDB log block size
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path, wait_s: float = 30.0) -> list[Any]:
    """Every protobuf ``Record`` of an offline ``run-<id>.wandb`` file, CRCs checked, once the
    file holds the run's exit record (or after ``wait_s``: what is there by then)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = _read_records(path)
        except (AssertionError, struct.error):
            if time.monotonic() > deadline:
                raise
            records = []  # the header or a chunk still being written
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer too small for a chunk header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad CRC at {pos}"
        chunks += payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _keys(items) -> set[str]:
    return {"/".join(item.nested_key) if item.nested_key else item.key for item in items}


def wandb_contents(path: Path) -> dict[str, Any]:
    """The run record, history keys and summary keys of an offline run file."""
    runs, history, summary = [], set(), set()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            history |= _keys(record.history.item)
        elif kind == "summary":
            summary |= _keys(record.summary.update)
    assert len(runs) == 1, f"{path}: {len(runs)} run records"
    return {"run": runs[0], "history": history, "summary": summary}


def wandb_exit_code(path: Path) -> int | None:
    """The exit code W&B recorded for an offline run (its exit record), or None if none."""
    exits = [r.exit for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    return exits[-1].exit_code if exits else None


def offline_runs(run_dir: Path, run_id: str) -> list[Path]:
    # A second part started within the same second gets a "-1" suffix on its directory.
    return sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))


def until(what: str, predicate, timeout: float = 30):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def sacct_field(job_id: str, field: str) -> str:
    """One field of a job's accounting record (sacct), "" while it has none."""
    res = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", field, "-j", job_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""


def sacct_state(job_id: str) -> str:
    return sacct_field(job_id, "State")


def train_losses(run_dir: Path) -> dict[int, float]:
    from multieye_dist.track.records import read_metrics

    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def random_batch(n: int = 6, size: int = 32, seed: int = 0, paired: bool = True):
    """A synthetic :class:`Batch` (labels 0..2 repeating; OCT partners with the same labels)."""
    import torch

    from multieye_dist.data.batch import Batch, StreamStats

    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 3
    return Batch(
        image=torch.randn(n, 3, size, size, generator=g),
        label=label,
        keys=[f"{seed}-{i}" for i in range(n)],
        meta=[{} for _ in range(n)],
        stats=StreamStats(),
        partner_image=torch.randn(n, 3, size, size, generator=g) if paired else None,
        partner_label=label.clone() if paired else None,
        partner_keys=[f"o{seed}-{i}" for i in range(n)] if paired else None,
    )


# A tiny training run: test_resnet (0.4 M parameters) at 32 px, one epoch of 64 samples, fp32,
# no tracker: what tests that need a real run but not a particular setting start from.
TINY_RUN = {
    "model.backbone": "test_resnet",
    "data.image_size": 32,
    "data.batch_size": 8,
    "data.samples_per_epoch": 64,
    "data.num_workers": 0,
    "data.augment": "false",
    "train.epochs": 1,
    "train.eval_every_epochs": 1,  # the demo config evaluates every 2nd epoch
    "train.log_every_steps": 1,
    "train.precision": "fp32",
    "train.progress": "false",
    "train.plots": "false",  # tests/test_plots.py checks the pictures of a finished training
    "optim.warmup_epochs": 0,
    "teacher.dtype": "fp32",
    "tracking.wandb.mode": "disabled",
}


def tiny_overrides(shards: Path | str, out: Path | str, *extra: str) -> list[str]:
    """Overrides of a :data:`TINY_RUN` from `shards` into `out`, then `extra` (a later override
    of a key wins)."""
    base = {**TINY_RUN, "data.shards": shards, "train.out_dir": out}
    return [f"{k}={v}" for k, v in base.items()] + list(extra)


def spawn_single(fn, *args, timeout: float = 240) -> None:
    """fn(0, 1, *args) in a fresh spawned process that makes its own process group (as a plain
    `multieye-dist train` does), so that none leaks into pytest; fail the test if it outlasts
    `timeout` or exits non-zero."""
    import multiprocessing as mp

    import pytest

    p = mp.get_context("spawn").Process(target=fn, args=(0, 1, *args))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"{fn.__name__} timed out after {timeout}s")
    assert p.exitcode == 0, f"{fn.__name__} exited {p.exitcode}"


# ------------------------------------------------------------------ jobs through launch/*.py

ROOT = Path(__file__).resolve().parents[1]


def slurm_tiny(shards: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of the tiny distillation run that Slurm tests submit (16 steps on 2 ranks: 2
    epochs x 128 samples / batch 8 / 2 ranks), into `out`, then `extra`."""
    return [
        "train.stage=distill", "loss.name=fundus-only", "model.backbone=test_resnet",
        f"data.shards={shards}", "data.image_size=32", "data.batch_size=8",
        "data.samples_per_epoch=128", "train.epochs=2", f"train.out_dir={out}",
        "train.log_every_steps=1", "train.progress=false", "train.plots=false", *extra,
    ]  # fmt: skip


def launch(script: str, *args: str, env: dict, timeout: float = 300):
    """launch/`script` ARGS in a subprocess from the project root, `env` over os.environ."""
    import os
    import sys

    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **env},
    )  # fmt: skip


def submit_two_tasks(cluster, shards: Path, out: Path, env: dict, *flags: str):
    """launch/submit.py: the tiny distillation run (:func:`slurm_tiny`) as one job of 2 tasks
    (ranks) on one node of `cluster`'s default partition."""
    return launch(
        "submit.py", "--config", "configs/demo.yaml", "--tasks-per-node", "2",
        "--partition", cluster.partition, "--time", "10", *flags, *slurm_tiny(shards, out),
        env=env,
    )  # fmt: skip


def load_script(name: str, as_name: str, folder: str = "launch"):
    """`folder`/`name` (launch/, benchmarks/) as module `as_name` (it is a script: launched,
    it runs as __main__), registered in sys.modules (submitit's pickling and dataclasses look
    it up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(as_name, ROOT / folder / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module
    spec.loader.exec_module(module)
    return module


def shipped_by_value(module, obj, code: str, cwd: Path) -> str:
    """Pickle `obj` as submitit does a launcher's task (cloudpickle, `module` by value: launched,
    a launch/ script is __main__), run `code` in a fresh interpreter that cannot import the
    launcher (no PYTHONPATH, another working directory) with the pickle on stdin; its stdout."""
    import os
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    try:
        blob = cloudpickle.dumps(obj)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, cwd=cwd, env=env
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode()


def train_steps(run_dir: Path) -> list[int]:
    """The steps of a run's metrics.jsonl that logged a training loss, in order."""
    from multieye_dist.track.records import read_metrics

    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
