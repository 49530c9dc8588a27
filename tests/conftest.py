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


# ----------------------------------------------------------------- training runs


@pytest.fixture(scope="session")
def shards(synth_root, tmp_path_factory) -> Path:
    """The synthetic dataset as 32 px shards, for training runs."""
    from multieye_dist.data.preprocess import Preprocess
    from multieye_dist.data.shards import ConvertOptions, convert

    out = tmp_path_factory.mktemp("train") / "shards"
    opts = ConvertOptions(shard_samples=20, workers=2, preprocess=Preprocess(image_size=32))
    convert(synth_root, out, opts, progress=False)
    return out


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """An (untrained) OCT teacher export: distillation only needs a frozen model to read."""
    import torch

    from multieye_dist.model.checkpoint import export_inference
    from multieye_dist.model.concept_model import ConceptModel, ModelConfig
    from multieye_dist.model.concepts import load_bank

    bank, sentences, _ = load_bank(
        Path(__file__).resolve().parents[1] / "configs/concepts/minilm-l6.safetensors"
    )
    cfg = ModelConfig(backbone="test_resnet")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "best.safetensors"
    export_inference(
        path,
        ConceptModel(cfg, bank),
        cfg,
        concept_sentences=sentences,
        image_size=32,
        extra={"modality": "oct"},
    )
    return path


@pytest.fixture(scope="session")
def wandb_home(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("wandb_home")
    return {
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
    }


# --- A real Slurm cluster (launch/slurm_cluster.sh) ------------------------------------------

NS_NODES = 2  # namespace nodes booted with the session's cluster (partition `multi`)


class SlurmCluster:
    """A running cluster: its state directory, slurm.conf and default partition (one node, this
    host); `multi_partition` (nodes node1..nodeN, each in a network namespace of its own) is
    None where namespaces cannot be made here, with `multi_skip` saying why."""

    partition = "debug"

    def __init__(self, state_dir: Path, script: Path) -> None:
        self.state_dir = state_dir
        self.conf = state_dir / "etc" / "slurm.conf"
        self.script = script
        self.multi_partition: str | None = None
        self.multi_nodes = 0
        self.multi_skip = ""

    def run(self, *args: str, timeout: float = 180):
        """launch/slurm_cluster.sh ARGS on this cluster's state directory."""
        import os
        import subprocess

        return subprocess.run(
            ["bash", str(self.script), *args],
            env={**os.environ, "MULTIEYE_SLURM_DIR": str(self.state_dir)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def slurm_cluster():
    """Boots a Slurm cluster for the session and points SLURM_CONF at it; tears it down after.

    The state lives in a fresh temporary directory (removed afterwards), so that concurrent
    sessions never share daemons; with $MULTIEYE_SLURM_DIR set, that directory's cluster is
    used, and left running if it already was. Where Slurm cannot be booted (not root, packages
    missing: the script exits 3) the tests skip, except under CI=true, where they fail."""
    import os
    import shlex
    import tempfile

    script = Path(__file__).resolve().parents[1] / "launch" / "slurm_cluster.sh"
    given = os.environ.get("MULTIEYE_SLURM_DIR")
    state_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="multieye-slurm-"))
    cluster = SlurmCluster(state_dir, script)

    was_running = given is not None and cluster.run("status").returncode == 0
    # The namespace nodes come with the session's cluster (a second partition costs a second
    # of boot; a second cluster would cost a dozen). A cluster of $MULTIEYE_SLURM_DIR that is
    # already running keeps the nodes it has: asking for others would restart it.
    nodes_file = state_dir / "etc" / "nodes"
    nodes = int(nodes_file.read_text()) if was_running and nodes_file.is_file() else NS_NODES
    up = cluster.run("up", "--nodes", str(nodes))
    if up.returncode == 3 and nodes and os.environ.get("CI") != "true":
        # Namespaces may be what is missing: the single-node tests can still run.
        cluster.multi_skip = (up.stderr or up.stdout).strip()
        nodes = 0
        up = cluster.run("up")
    if up.returncode != 0:
        # What the failed boot started (daemons, namespaces) must not outlive it.
        if not given:
            cluster.run("purge")
            shutil.rmtree(state_dir, ignore_errors=True)
        elif not was_running:
            cluster.run("down")
        reason = (up.stderr or up.stdout).strip()
        if up.returncode == 3 and os.environ.get("CI") != "true":
            pytest.skip(reason)
        pytest.fail(f"slurm_cluster.sh up exited {up.returncode}:\n{reason}")
    if nodes:
        cluster.multi_partition, cluster.multi_nodes = "multi", nodes
    elif not cluster.multi_skip:
        cluster.multi_skip = f"the cluster in {state_dir} runs without namespace nodes (up --nodes)"

    # What `env` prints (SLURM_CONF) must be in os.environ: submitit runs sbatch, sacct and
    # scancel as subprocesses of this process, and the jobs inherit it for srun.
    saved: dict[str, str | None] = {}
    for line in cluster.run("env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        saved.setdefault(key, os.environ.get(key))
        os.environ[key] = shlex.split(value)[0]  # the script quotes values for a shell
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not given:
            cluster.run("purge")
        elif not was_running:
            cluster.run("down")


@pytest.fixture(scope="session")
def slurm_cluster_multi(slurm_cluster) -> SlurmCluster:
    """The session's cluster, for tests that need its namespace nodes (partition `multi`):
    skipped where they could not be made, except under CI=true."""
    import os

    if slurm_cluster.multi_partition is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no namespace nodes: {slurm_cluster.multi_skip}")
        pytest.skip(slurm_cluster.multi_skip)
    return slurm_cluster


@pytest.fixture(scope="session")
def two_task_job(slurm_cluster, shards, wandb_home, tmp_path_factory) -> Path:
    """launch/submit.py's tiny 2-task DeepSpeed job on one node, run to its end (--wait): the
    reference of the Slurm tests (tests/test_launch.py, tests/test_slurm_multinode.py)."""
    import re

    from helpers import submit_two_tasks

    out = tmp_path_factory.mktemp("submit") / "run"
    proc = submit_two_tasks(slurm_cluster, shards, out, wandb_home, "--wait")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"submitted job \d+: 1 node\(s\) x 2 task\(s\)", proc.stdout)
    assert "logs: " in proc.stdout and str(out) in proc.stdout
    return out
