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


def run_ranks(fn, world: int, *args, timeout: float = 120) -> None:
    """Run fn(rank, world, port, *args) in `world` spawned processes (each sets up its own gloo
    group on 127.0.0.1:port); fail the test, killing them, if they outlast `timeout`."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run of {fn.__name__} timed out after {timeout}s")
