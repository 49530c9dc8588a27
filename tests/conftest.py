"""Shared fixtures: small synthetic MultiEYE roots made by the project itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multieye_dist.data.synth import SynthOptions, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A read-only reference dataset: 9 classes x (6 train, 2 dev, 2 test) per modality."""
    root = tmp_path_factory.mktemp("synth") / "raw"
    generate(root, SynthOptions(per_class=6, seed=1, image_size=48, workers=2))
    return root


@pytest.fixture
def fresh_root(synth_root, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    root = tmp_path / "raw"
    shutil.copytree(synth_root, root)
    return root


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
